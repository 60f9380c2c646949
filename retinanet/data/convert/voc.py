"""Pascal VOC XML folder -> COCO JSON.

One XML per image (``Annotations/*.xml``) with ``filename``, ``size/width``, ``size/height`` and
``object`` elements holding ``name``, ``bndbox/{xmin,ymin,xmax,ymax}`` and optionally ``difficult``.
VOC pixel coordinates are 1-based and inclusive, so ``xyxy = (xmin - 1, ymin - 1, xmax, ymax)``
(the usual convention, e.g. detectron2's). ``difficult`` objects become crowd (ignore) regions by
default: in training no anchor learns them as object or background, in COCO evaluation a
detection on them is neither a hit nor a false positive (close to VOC's own rule).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from retinanet.data.convert.common import IMAGE_EXTENSIONS, CocoBuilder, ConvertError, image_size, relative_name

DIFFICULT = ("crowd", "keep", "drop")


def _text(node, path: str, where: str, required: bool = True) -> str | None:
    child = node.find(path)
    if child is None or child.text is None or not child.text.strip():
        if required:
            raise ConvertError(f"{where}: missing field <{path}>")
        return None
    return child.text.strip()


def _number(node, path: str, where: str) -> float:
    text = _text(node, path, where)
    try:
        return float(text)
    except ValueError:
        raise ConvertError(f"{where}: field <{path}>={text!r} is not a number") from None


def _find_image(xml: Path, name: str | None, image_dir: Path) -> Path:
    """The image of an XML: its ``filename`` in ``image_dir``, else a file with the same stem (wrong or no
    extension in the XML)."""
    if name and (image_dir / name).is_file():
        return image_dir / name
    stem = Path(name).stem if name else xml.stem
    for candidate in sorted(image_dir.glob(f"{stem}.*")):
        if candidate.suffix.lower() in IMAGE_EXTENSIONS:
            return candidate
    raise ConvertError(f"{xml}: field <filename>={name!r}: no such image in {str(image_dir)!r}")


def convert_voc(annotations: str | Path, images: str | Path, class_names: list[str] | None = None,
                difficult: str = "crowd", ids: list[str] | None = None) -> dict:
    """COCO dict from the XML files of ``annotations`` (all, or the stems in ``ids``, e.g. an ImageSets list).

    ``file_name``s are relative to ``images``; ``difficult``: crowd (ignore region), keep (a normal box) or drop.
    """
    ann_dir, image_dir = Path(annotations), Path(images)
    if difficult not in DIFFICULT:
        raise ConvertError(f"--difficult={difficult!r} must be one of {list(DIFFICULT)}")
    for what, folder in (("annotation", ann_dir), ("image", image_dir)):
        if not folder.is_dir():
            raise ConvertError(f"{what} folder {str(folder)!r} not found")
    xmls = [ann_dir / f"{i}.xml" for i in ids] if ids is not None else sorted(ann_dir.glob("*.xml"))
    if not xmls:
        raise ConvertError(f"no .xml file in {str(ann_dir)!r}")
    builder = CocoBuilder(str(ann_dir), class_names)
    for xml in xmls:
        try:
            root = ET.parse(xml).getroot()
        except FileNotFoundError:
            raise ConvertError(f"annotation file {str(xml)!r} not found (listed in the ids file)") from None
        except ET.ParseError as err:
            line, col = err.position
            raise ConvertError(f"{xml}: malformed XML at line {line} column {col}: {err}") from None
        path = _find_image(xml, _text(root, "filename", str(xml), required=False), image_dir)
        width = _text(root, "size/width", str(xml), required=False)
        height = _text(root, "size/height", str(xml), required=False)
        try:
            w, h = int(float(width)), int(float(height))
        except (TypeError, ValueError):
            w = h = 0
        if w <= 0 or h <= 0:  # absent or 0 (some tools): read the image header
            w, h = image_size(path, str(xml))
        image_id = builder.add_image(relative_name(path, image_dir, str(xml)), w, h)
        for k, obj in enumerate(root.findall("object")):
            where = f"{xml}: object {k}"
            name = _text(obj, "name", where)
            hard = _text(obj, "difficult", where, required=False) in ("1", "true")
            if hard and difficult == "drop":
                continue
            box = [_number(obj, f"bndbox/{f}", where) for f in ("xmin", "ymin", "xmax", "ymax")]
            box[0] -= 1.0  # 1-based inclusive -> continuous pixel coordinates
            box[1] -= 1.0
            builder.add_box(image_id, name, box, where, iscrowd=int(hard and difficult == "crowd"))
    return builder.to_coco()
