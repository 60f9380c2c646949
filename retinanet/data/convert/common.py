"""What every converter needs: a COCO builder with clear errors, image sizes from file headers, a split."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from retinanet.boxes import xyxy_to_xywh
from retinanet.data.image_io import IMAGE_EXTENSIONS  # noqa: F401  (re-exported)
from retinanet.errors import UserError
from retinanet.files import atomic_write_json

log = logging.getLogger(__name__)

_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class ConvertError(UserError):
    """An input annotation file is malformed; the message names the file, line or record, field and value."""


def image_size(path: Path, where: str) -> tuple[int, int]:
    """(width, height) of an image as displayed (EXIF orientation applied), from its header only."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except FileNotFoundError:
        raise ConvertError(f"{where}: image {str(path)!r} not found") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise ConvertError(f"{where}: cannot read image {str(path)!r}: {err}") from None
    return (h, w) if orientation in _TRANSPOSED else (w, h)


def relative_name(path: Path, root: Path, where: str) -> str:
    """``path`` as a file name relative to ``root`` (refused when it lies outside)."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        raise ConvertError(f"{where}: image {str(path)!r} is outside the image folder {str(root)!r}; give the folder "
                           "holding every image as the image root")
    return Path(rel).as_posix()


def read_class_names(path: Path) -> list[str]:
    """Class names, one per line (blank lines ignored)."""
    try:
        names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as err:
        raise ConvertError(f"cannot read class names from {str(path)!r}: {err}") from None
    if len(set(names)) != len(names) or not names:
        raise ConvertError(f"{path}: class names must be unique and non-empty, got {names}")
    return names


class CocoBuilder:
    """Collects images and xyxy boxes; categories get ids 1..K (``class_names`` order, or sorted names).

    With ``class_names`` given, an unknown class raises; boxes with zero or negative size are
    dropped with one counted warning naming the first.
    """

    def __init__(self, source: str, class_names: list[str] | None = None):
        self.source = source
        self.fixed = list(class_names) if class_names is not None else None
        self.images: list[dict] = []
        self._boxes: list[tuple] = []  # (image_id, name, x1, y1, x2, y2, iscrowd)
        self.degenerate: list[str] = []

    def add_image(self, file_name: str, width: int, height: int) -> int:
        self.images.append({"id": len(self.images) + 1, "file_name": file_name, "width": int(width),
                            "height": int(height)})
        return len(self.images)

    def add_box(self, image_id: int, name: str, box, where: str, iscrowd: int = 0) -> None:
        x1, y1, x2, y2 = (float(v) for v in box)
        if self.fixed is not None and name not in self.fixed:
            raise ConvertError(f"{where}: class {name!r} is not one of the given classes {self.fixed}")
        if not (x2 > x1 and y2 > y1):
            self.degenerate.append(f"{where}: box {[x1, y1, x2, y2]}")
            return
        self._boxes.append((image_id, name, x1, y1, x2, y2, int(iscrowd)))

    def to_coco(self) -> dict:
        names = self.fixed if self.fixed is not None else sorted({b[1] for b in self._boxes})
        ids = {name: i + 1 for i, name in enumerate(names)}
        xywh = xyxy_to_xywh(np.array([b[2:6] for b in self._boxes], dtype=np.float64).reshape(-1, 4)).tolist()
        anns = [{"id": k + 1, "image_id": img, "category_id": ids[name], "bbox": bbox, "area": bbox[2] * bbox[3],
                 "iscrowd": crowd} for k, ((img, name, *_, crowd), bbox) in enumerate(zip(self._boxes, xywh))]
        if self.degenerate:
            log.warning("%s: dropped %d boxes with zero or negative width/height; first: %s", self.source,
                        len(self.degenerate), self.degenerate[0])
        return {"images": self.images, "annotations": anns,
                "categories": [{"id": ids[n], "name": n} for n in names]}


def split_train_val(data: dict, val_fraction: float, seed: int = 0) -> tuple[dict, dict]:
    """Split a COCO dict by image (a seeded random choice of ``val_fraction`` of the images) into train, val."""
    if not 0.0 < val_fraction < 1.0:
        raise ConvertError(f"--val-fraction={val_fraction} must be between 0 and 1")
    n = len(data["images"])
    n_val = int(round(n * val_fraction))
    if n_val == 0 or n_val == n:
        raise ConvertError(f"--val-fraction={val_fraction} of {n} images leaves an empty split")
    val_idx = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    parts = []
    for want_val in (False, True):
        images = [img for i, img in enumerate(data["images"]) if (i in val_idx) == want_val]
        ids = {img["id"] for img in images}
        anns = [a for a in data["annotations"] if a["image_id"] in ids]
        parts.append({**data, "images": images, "annotations": anns})
    return parts[0], parts[1]


def write_coco(data: dict, path: str | os.PathLike) -> None:
    """Write the COCO JSON atomically (``retinanet.files``: a crash never leaves half a file; no torch import)."""
    atomic_write_json(data, path, indent=1)
