"""``data.verify``: every image of a split checked when its dataset is built (``data.on_error=raise``), so that a
file that cannot be used stops a run before its first step rather than in its final evaluation.

- ``true`` (default): every image decoded in full, on threads (Pillow's decoders release the GIL), with a
  progress bar;
- ``header``: only each file's header read (format, size, EXIF orientation; no pixel decoded): cheap enough for
  datasets too large to decode up front; finds missing, non-image and wrongly sized files, not a corrupt pixel
  stream;
- ``false``: no check (a bad file then fails when it is loaded).

A JPEG that is merely truncated is usable (``image_io``: decoded to what it holds) and only counted. The header
also tells which orientation the annotations follow: a non-square image with a 90-degree EXIF rotation matches
either its stored or its rotated size (``ExifEvidence``), which a square image cannot show.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image
from tqdm import tqdm

from retinanet.data.image_io import ImageReadError, decode_check
from retinanet.errors import ConfigError

EXIF_ORIENTATION = 0x0112
TRANSPOSING = (5, 6, 7, 8)  # EXIF orientations that swap width and height
MAX_THREADS = 16


def check_verify(value) -> bool | str:
    if not (value is True or value is False or value == "header"):
        raise ConfigError(f"data.verify={value!r} must be true (decode every image), header (read each file's "
                          "header only) or false (no check)")
    return value


@dataclass
class ImageCheck:
    problem: str | None = None   # why the image cannot be used (None: it can)
    truncated: bool = False      # a truncated JPEG, decoded to what it holds
    rotated: str | None = None   # a 90-degree EXIF rotation: "square", or which size the annotation matches
                                 # ("upright" = as EXIF rotates it, "stored" = the stored pixels)


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation from the header (a PNG's ``getexif`` would decode the pixels to find a late chunk)."""
    if im.format == "PNG":
        exif = Image.Exif()
        if im.info.get("exif"):
            exif.load(im.info["exif"])
        return exif.get(EXIF_ORIENTATION, 1)
    return im.getexif().get(EXIF_ORIENTATION, 1)


def check_image(path: str, height: int, width: int, decode: bool) -> ImageCheck:
    """Whether image ``path``, annotated as ``height`` x ``width``, can be used (``decode``: decoded in full)."""
    try:
        with Image.open(path) as im:
            stored_w, stored_h = im.size
            orientation = _orientation(im)
        truncated = decode_check(path) if decode else False
    except FileNotFoundError:
        return ImageCheck(problem="file not found")
    except ImageReadError as err:
        return ImageCheck(problem=str(err).replace(f"cannot read image {path}: ", "cannot be decoded: "))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return ImageCheck(problem=f"cannot be decoded: {type(err).__name__}: {err}")
    transposed = orientation in TRANSPOSING
    upright = (stored_w, stored_h) if transposed else (stored_h, stored_w)
    if (height, width) not in ((stored_h, stored_w), upright):
        return ImageCheck(problem=f"is width={stored_w}, height={stored_h} but the annotation file says "
                                  f"width={width}, height={height}")
    rotated = None
    if transposed:
        rotated = "square" if stored_w == stored_h else ("upright" if (height, width) == upright else "stored")
    return ImageCheck(truncated=truncated, rotated=rotated)


def verify_images(paths: list[str], sizes_hw, decode: bool, desc: str, progress: bool = True) -> list[ImageCheck]:
    """``check_image`` of every path (with its annotated (h, w)), in parallel, in order."""
    threads = max(1, min(MAX_THREADS, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                         else os.cpu_count() or 1))
    jobs = [(p, int(h), int(w)) for p, (h, w) in zip(paths, sizes_hw)]
    with ThreadPoolExecutor(threads) as pool:
        results = pool.map(lambda job: check_image(*job, decode=decode), jobs, chunksize=16)
        return list(tqdm(results, total=len(jobs), desc=desc, leave=False, disable=not progress or not jobs,
                         dynamic_ncols=True, unit="image"))
