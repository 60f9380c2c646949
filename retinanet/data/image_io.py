"""Image decoding: any file PIL can read -> RGB uint8 [H, W, 3], upright, with clear errors.

The format is found from the content (a PNG named ``.jpg`` is fine), EXIF orientation is
applied, and every pixel mode becomes 8-bit RGB: palette and grey are expanded, alpha is
composited over white, CMYK is converted, 16-bit and 32-bit integer images are scaled (not
clipped) to 8 bits, float images are mapped from [0, 1] (or from their own range otherwise).

A JPEG that is merely truncated (missing its last bytes) decodes to what it holds, as OpenCV and image
viewers do (other formats still fail): Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is set for that one decode only (under a
lock, restored after), with one warning per file and process (``note_truncated``).
"""

from __future__ import annotations

import logging
import os
import threading
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps

from retinanet.errors import UserError

# file extensions taken as images when a folder is searched (decoding itself goes by content)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                    ".ppm", ".pgm", ".pbm")


log = logging.getLogger(__name__)
_LENIENT = threading.Lock()  # Pillow's truncated-image switch is global: one lenient decode at a time
_truncated: set[str] = set()  # truncated files met by this process (each logged once)


class ImageReadError(UserError):
    """An image file is missing, truncated, corrupt or in a mode we cannot convert; names the file."""


def _scale_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """A 2-D integer or float array -> uint8, scaling by the value range of its mode."""
    if mode.startswith("I;16"):
        return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if mode == "I":  # 32-bit ints: mostly 16-bit data (old Pillow PNG decoding, TIFF)
        if arr.size and arr.min() >= 0 and arr.max() <= 65535:
            return ((arr.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    else:  # "F": floats in [0, 1] are intensities
        arr = np.nan_to_num(arr.astype(np.float64))
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            return np.rint(arr * 255.0).astype(np.uint8)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 1.0)
    return np.rint((arr - lo) * (255.0 / max(hi - lo, 1e-12))).astype(np.uint8)


def to_rgb_array(im: Image.Image) -> np.ndarray:
    """A decoded PIL image of any mode -> RGB uint8 [H, W, 3]."""
    if im.mode == "RGB":
        return np.asarray(im, dtype=np.uint8).copy()
    if im.mode.startswith("I") or im.mode == "F":
        grey = _scale_to_uint8(np.asarray(im), im.mode)  # [H, W]
        return np.repeat(grey[:, :, None], 3, axis=2)  # [H, W] -> [H, W, 3]
    if "A" in im.mode or im.mode in ("RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8).copy()
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def _decode(path: str, exif: bool) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. palette-with-transparency notices
        with Image.open(path) as im:
            im.load()  # force the full decode now: truncated files fail here
            if exif:
                im = ImageOps.exif_transpose(im)
            return to_rgb_array(im)


def is_truncated_jpeg(path: str, err: Exception) -> bool:
    """Whether ``err`` is Pillow's error for a JPEG file that ends early (its data so far is decodable)."""
    if not (isinstance(err, OSError) and "truncated" in str(err).lower()):
        return False
    with Image.open(path) as im:
        return im.format == "JPEG"


def decode_truncated(path: str, exif: bool = True) -> np.ndarray:
    """What a truncated JPEG holds (the missing part grey); raises like Pillow when even that fails."""
    with _LENIENT:
        before = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            return _decode(path, exif)
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = before


def note_truncated(path: str, quiet: bool = False) -> None:
    """Remember a truncated file: one warning per file and process (``quiet``: none, it was reported already)."""
    if path in _truncated:
        return
    _truncated.add(path)
    if not quiet:
        log.warning("image %s is truncated: decoded what it holds (the rest grey)", path)


def decode_check(path) -> bool:
    """Decode ``path`` fully (no conversion) as ``load_rgb`` would; returns whether it is a truncated JPEG (still
    decodable). Raises ``ImageReadError`` when it cannot be used."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageReadError(f"image file not found: {path}")
    try:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(path) as im:
                    im.load()
            return False
        except OSError as err:
            if not is_truncated_jpeg(path, err):
                raise
            decode_truncated(path, exif=False)
            return True
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageReadError(f"cannot read image {path}: {type(err).__name__}: {err}") from err


def load_rgb(path, exif: bool = True) -> np.ndarray:
    """Decode ``path`` fully into RGB uint8 [H, W, 3]; ``exif=False`` keeps the stored pixel orientation.
    A truncated file gives what it holds (``note_truncated``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageReadError(f"image file not found: {path}")
    try:
        try:
            return _decode(path, exif)
        except OSError as err:
            if not is_truncated_jpeg(path, err):
                raise
            image = decode_truncated(path, exif)
            note_truncated(path)
            return image
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageReadError(f"cannot read image {path}: {type(err).__name__}: {err}") from err
