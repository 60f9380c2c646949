"""CSV boxes (the format of popular RetinaNet repositories) -> COCO JSON.

One row per box, ``path,x1,y1,x2,y2,class_name`` in absolute pixels, and ``path,,,,,`` for an image
without objects. ``path`` is relative to the image root (default: the CSV's folder) or absolute
inside it. An optional classes CSV ``class_name,id`` fixes the class order (by id); otherwise
classes are sorted by name. An optional header row ``path,x1,y1,x2,y2,class`` is skipped.
"""

from __future__ import annotations

import csv
from pathlib import Path

from retinanet.data.convert.common import CocoBuilder, ConvertError, image_size, relative_name

FIELDS = ("path", "x1", "y1", "x2", "y2", "class")


def read_classes_csv(path: str | Path) -> list[str]:
    """Class names ordered by id from ``class_name,id`` rows."""
    rows = _rows(Path(path))
    pairs = []
    for line, row in rows:
        if len(row) != 2:
            raise ConvertError(f"{path} line {line}: expected 2 columns class_name,id, got {len(row)}: {row}")
        try:
            pairs.append((int(row[1]), row[0].strip()))
        except ValueError:
            raise ConvertError(f"{path} line {line}: field 'id'={row[1]!r} is not an integer") from None
    ids, names = [p[0] for p in pairs], [p[1] for p in pairs]
    if len(set(ids)) != len(ids) or len(set(names)) != len(names) or not names:
        raise ConvertError(f"{path}: class names and ids must be unique, got {pairs}")
    return [name for _, name in sorted(pairs)]


def _rows(path: Path) -> list[tuple[int, list[str]]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return [(i + 1, row) for i, row in enumerate(csv.reader(f)) if any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ConvertError(f"cannot read CSV {str(path)!r}: {err}") from None


def convert_csv(csv_file: str | Path, images: str | Path | None = None, classes: str | Path | None = None) -> dict:
    """COCO dict from a box CSV; ``file_name``s are relative to ``images`` (default: the CSV's folder)."""
    csv_file = Path(csv_file)
    if not csv_file.is_file():
        raise ConvertError(f"CSV file {str(csv_file)!r} not found")
    root = Path(images) if images is not None else csv_file.parent
    builder = CocoBuilder(str(csv_file), read_classes_csv(classes) if classes is not None else None)
    image_ids: dict[str, int] = {}
    for line, row in _rows(csv_file):
        where = f"{csv_file} line {line}"
        if len(row) != len(FIELDS):
            raise ConvertError(f"{where}: expected {len(FIELDS)} columns {','.join(FIELDS)}, got {len(row)}: {row}")
        row = [c.strip() for c in row]
        if line == 1 and row[1].lower() == "x1":
            continue  # header
        path = Path(row[0]) if Path(row[0]).is_absolute() else root / row[0]
        name = relative_name(path, root, where)
        if name not in image_ids:
            w, h = image_size(path, where)
            image_ids[name] = builder.add_image(name, w, h)
        if not any(row[1:]):
            continue  # an image without objects
        box = []
        for field, value in zip(FIELDS[1:5], row[1:5]):
            try:
                box.append(float(value))
            except ValueError:
                raise ConvertError(f"{where}: field '{field}'={value!r} is not a number") from None
        if not row[5]:
            raise ConvertError(f"{where}: field 'class' is empty (a row without a box must leave all five empty)")
        builder.add_box(image_ids[name], row[5], box, where)
    return builder.to_coco()
