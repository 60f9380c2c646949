"""Image decoding: any file PIL can read -> RGB uint8 [H, W, 3], upright, with clear errors.

The format is found from the content (a PNG named ``.jpg`` is fine), EXIF orientation is
applied, and every pixel mode becomes 8-bit RGB: palette and grey are expanded, alpha is
composited over white, CMYK is converted, 16-bit and 32-bit integer images are scaled (not
clipped) to 8 bits, float images are mapped from [0, 1] (or from their own range otherwise).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageOps

from retinanet.errors import UserError

# file extensions taken as images when a folder is searched (decoding itself goes by content)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                    ".ppm", ".pgm", ".pbm")


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


def load_rgb(path, exif: bool = True) -> np.ndarray:
    """Decode ``path`` fully into RGB uint8 [H, W, 3]; ``exif=False`` keeps the stored pixel orientation."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageReadError(f"image file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. palette-with-transparency notices
            with Image.open(path) as im:
                im.load()  # force the full decode now: truncated files fail here
                if exif:
                    im = ImageOps.exif_transpose(im)
                return to_rgb_array(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageReadError(f"cannot read image {path}: {type(err).__name__}: {err}") from err
