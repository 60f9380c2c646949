"""YOLO txt labels -> COCO JSON.

One ``.txt`` per image with rows ``class cx cy w h`` (normalised to [0, 1] by the image size; a
row with more values is a segmentation polygon ``class x1 y1 x2 y2 ...``, whose bounding box is
used). Labels are found like Ultralytics does (``.../images/...`` -> ``.../labels/...``), or next
to the image, or under ``labels`` with the same relative path; an image without a label file
has no objects. Class names come from a ``.txt`` (one per line, e.g. darknet's obj.names) or a
``.yaml`` with ``names:`` (a list or an ``{index: name}`` map, as in Ultralytics' data.yaml).
YOLO class ``k`` becomes category id ``k + 1``.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from retinanet.data.convert.common import IMAGE_EXTENSIONS, CocoBuilder, ConvertError, image_size, read_class_names, relative_name


def read_names(path: str | Path) -> list[str]:
    path = Path(path)
    if path.suffix.lower() not in (".yaml", ".yml"):
        return read_class_names(path)
    try:
        names = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("names")
    except (OSError, yaml.YAMLError, AttributeError) as err:
        raise ConvertError(f"cannot read class names from {str(path)!r}: {err}") from None
    if isinstance(names, dict) and sorted(names) == list(range(len(names))):
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names:
        raise ConvertError(f"{path}: 'names' must be a list of class names or a map 0..K-1 -> name, got {names!r}")
    return [str(n) for n in names]


def label_path(image: Path, images: Path, labels: Path | None) -> Path:
    """Where the label file of ``image`` is: under ``labels`` (same relative path), in the sibling
    ``labels`` folder of the nearest ``images`` folder (Ultralytics), or next to the image."""
    if labels is not None:
        return (labels / image.relative_to(images)).with_suffix(".txt")
    parts = list(image.parts)
    if "images" in parts[:-1]:
        k = len(parts) - 2 - parts[:-1][::-1].index("images")
        candidate = Path(*parts[:k], "labels", *parts[k + 1:]).with_suffix(".txt")
        if candidate.is_file():
            return candidate
    return image.with_suffix(".txt")


def _box(values: list[str], where: str, w: int, h: int) -> list[float]:
    try:
        coords = [float(v) for v in values]
    except ValueError:
        raise ConvertError(f"{where}: coordinates {values} are not all numbers") from None
    if max(coords) > 1.0 + 1e-3 or min(coords) < -1e-3:
        raise ConvertError(f"{where}: coordinates {values} must be normalised to [0, 1] by the image size "
                           f"({w}x{h}); pixel coordinates are not YOLO format")
    if len(coords) == 4:
        cx, cy, bw, bh = coords
        return [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]
    xs, ys = coords[0::2], coords[1::2]
    return [min(xs) * w, min(ys) * h, max(xs) * w, max(ys) * h]


def convert_yolo(images: str | Path, names: str | Path, labels: str | Path | None = None) -> dict:
    """COCO dict from the images under ``images`` (recursive) and their YOLO label files."""
    images = Path(images)
    if not images.is_dir():
        raise ConvertError(f"image folder {str(images)!r} not found")
    class_names = read_names(names)
    builder = CocoBuilder(str(images), class_names)
    files = sorted(p for p in images.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ConvertError(f"no image file under {str(images)!r} (extensions {' '.join(IMAGE_EXTENSIONS)})")
    for image in files:
        w, h = image_size(image, str(image))
        image_id = builder.add_image(relative_name(image, images, str(image)), w, h)
        txt = label_path(image, images, Path(labels) if labels is not None else None)
        if not txt.is_file():
            continue  # YOLO: no label file = no objects
        for line, text in enumerate(txt.read_text(encoding="utf-8").splitlines(), start=1):
            values = text.split()
            if not values:
                continue
            where = f"{txt} line {line}"
            if len(values) != 5 and (len(values) < 7 or len(values) % 2 == 0):
                raise ConvertError(f"{where}: expected 'class cx cy w h' (or 'class x1 y1 x2 y2 ...' polygon), "
                                   f"got {len(values)} values: {text.strip()!r}")
            try:
                k = int(values[0])
            except ValueError:
                raise ConvertError(f"{where}: class {values[0]!r} is not an integer") from None
            if not 0 <= k < len(class_names):
                raise ConvertError(f"{where}: class {k} is out of range: {names} lists {len(class_names)} classes "
                                   f"(0..{len(class_names) - 1})")
            builder.add_box(image_id, class_names[k], _box(values[1:], where, w, h), where)
    return builder.to_coco()
