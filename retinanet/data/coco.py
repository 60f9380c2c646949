"""COCO-format detection dataset: validated JSON in, RGB image + xyxy boxes + contiguous labels out.

The annotation file is read once with ``json``, checked (a ``DatasetError`` names the file, the
record and the field on any mistake), then indexed by pycocotools (``self.coco``, used for
evaluation). Boxes are converted xywh -> xyxy once at construction: non-finite, zero / negative
size and entirely-outside boxes are dropped, boxes partly outside their image are clipped, and
one warning summarises the counts. Labels are 0..K-1 in order of sorted category id.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os

import numpy as np
import torch
from pycocotools.coco import COCO

from retinanet.data.image_io import load_rgb
from retinanet.errors import UserError

log = logging.getLogger(__name__)

REQUIRED_FIELDS = {
    "images": ("id", "file_name", "width", "height"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}


class DatasetError(UserError):
    """The annotation file or image folder is wrong; the message names the file, record and field."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_coco_json(ann_file: str) -> dict:
    """Load and structurally validate a COCO detection JSON (raises DatasetError)."""
    if not os.path.isfile(ann_file):
        raise DatasetError(f"annotation file not found: {ann_file}")
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{ann_file}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from err
    except (UnicodeDecodeError, OSError) as err:
        raise DatasetError(f"{ann_file}: cannot read as UTF-8 JSON: {err}") from err
    if not isinstance(data, dict):
        raise DatasetError(f"{ann_file}: top level must be a JSON object with keys {list(REQUIRED_FIELDS)}, "
                           f"got a {type(data).__name__}")
    missing = [k for k in REQUIRED_FIELDS if k not in data]
    if missing:
        raise DatasetError(f"{ann_file}: missing top-level key(s) {missing} (a COCO detection file has "
                           f"{list(REQUIRED_FIELDS)})")
    for key, fields in REQUIRED_FIELDS.items():
        if not isinstance(data[key], list):
            raise DatasetError(f"{ann_file}: '{key}' must be a list, got {type(data[key]).__name__}")
        seen = set()
        for i, rec in enumerate(data[key]):
            if not isinstance(rec, dict):
                raise DatasetError(f"{ann_file}: {key}[{i}] must be an object, got {str(rec)[:60]!r}")
            absent = [f for f in fields if f not in rec]
            if absent:
                raise DatasetError(f"{ann_file}: {key}[{i}] (id={rec.get('id')!r}) is missing field(s) {absent}")
            if not _is_int(rec["id"]):
                raise DatasetError(f"{ann_file}: {key}[{i}] field 'id' must be an integer, got {rec['id']!r}")
            if rec["id"] in seen:
                raise DatasetError(f"{ann_file}: {key}[{i}] has a duplicate id {rec['id']} (ids must be unique in "
                                   f"'{key}')")
            seen.add(rec["id"])
    _check_records(ann_file, data)
    return data


def _check_records(ann_file: str, data: dict) -> None:
    for i, img in enumerate(data["images"]):
        where = f"{ann_file}: images[{i}] (id={img['id']})"
        for field in ("width", "height"):
            if not _is_number(img[field]) or img[field] <= 0:
                raise DatasetError(f"{where} field '{field}' must be a positive number, got {img[field]!r}")
        name = img["file_name"]
        if not isinstance(name, str) or not name:
            raise DatasetError(f"{where} field 'file_name' must be a non-empty string, got {name!r}")
        norm = os.path.normpath(name)
        if os.path.isabs(name) or norm == os.pardir or norm.startswith(os.pardir + os.sep):
            raise DatasetError(f"{where} field 'file_name'={name!r} points outside the image folder; "
                               "file names must be relative paths inside it")
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat["name"], str):
            raise DatasetError(f"{ann_file}: categories[{i}] (id={cat['id']}) field 'name' must be a string, "
                               f"got {cat['name']!r}")
    image_ids = {img["id"] for img in data["images"]}
    cat_ids = {cat["id"] for cat in data["categories"]}
    for i, ann in enumerate(data["annotations"]):
        where = f"{ann_file}: annotations[{i}] (id={ann['id']})"
        if ann["image_id"] not in image_ids:
            raise DatasetError(f"{where} field 'image_id'={ann['image_id']!r} is not the id of any image")
        if ann["category_id"] not in cat_ids:
            raise DatasetError(f"{where} field 'category_id'={ann['category_id']!r} is not one of the "
                               f"categories {sorted(cat_ids)}")
        bbox = ann["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise DatasetError(f"{where} field 'bbox'={bbox!r} must be a list of 4 numbers [x, y, width, height]")
        if ann.get("iscrowd", 0) not in (0, 1):
            raise DatasetError(f"{where} field 'iscrowd'={ann['iscrowd']!r} must be 0 or 1")


def clean_boxes(xywh: np.ndarray, image_wh: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """COCO xywh [N, 4] -> (xyxy [N, 4] clipped to image_wh [N, 2], keep [N] bool, counts per reason)."""
    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.isfinite(xywh).all(axis=1)
        sized = finite & (xywh[:, 2] > 0) & (xywh[:, 3] > 0)
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        clipped = np.clip(xyxy, 0, np.concatenate([image_wh, image_wh], axis=1))
        inside = sized & (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
        was_clipped = inside & (clipped != xyxy).any(axis=1)
    counts = {"non-finite": int((~finite).sum()), "zero or negative width/height": int((finite & ~sized).sum()),
              "entirely outside the image": int((sized & ~inside).sum()), "clipped": int(was_clipped.sum())}
    return clipped, inside, counts


class CocoDetection(torch.utils.data.Dataset):
    """COCO-format dataset; ``transform(image, boxes, labels, crowd)`` as in ``transforms.DetectionTransform``."""

    def __init__(self, ann_file, img_dir, transform=None):
        self.ann_file, self.img_dir, self.transform = os.fspath(ann_file), os.fspath(img_dir), transform
        data = read_coco_json(self.ann_file)
        for ann in data["annotations"]:  # pycocotools' COCOeval needs both
            ann.setdefault("iscrowd", 0)
            ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco.createIndex()

        cats = sorted(data["categories"], key=lambda c: c["id"])
        self.label_to_cat_id = [c["id"] for c in cats]
        self.cat_id_to_label = {c: i for i, c in enumerate(self.label_to_cat_id)}
        self.class_names = [c["name"] for c in cats]
        images = data["images"]
        self.image_ids = [img["id"] for img in images]
        self._file_names = [img["file_name"] for img in images]
        self._sizes = np.array([[img["height"], img["width"]] for img in images], dtype=np.int64).reshape(-1, 2)
        self._check_files()
        self._index_boxes(data["annotations"])
        self._exif_warned = False

    @property
    def num_classes(self) -> int:
        return len(self.label_to_cat_id)

    def _check_files(self) -> None:
        if not os.path.isdir(self.img_dir):
            raise DatasetError(f"image folder not found: {self.img_dir} (images of {self.ann_file})")
        missing = [f for f in self._file_names if not os.path.exists(os.path.join(self.img_dir, f))]
        if missing:
            raise DatasetError(f"{len(missing)} of {len(self._file_names)} images listed in {self.ann_file} are "
                               f"missing from {self.img_dir}, e.g. {missing[:5]}")

    def _index_boxes(self, anns: list) -> None:
        """Per-image boxes as flat arrays sorted by image, with offsets (cheap to share with workers)."""
        row = {img_id: i for i, img_id in enumerate(self.image_ids)}
        img_idx = np.array([row[a["image_id"]] for a in anns], dtype=np.int64)
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        boxes, keep, counts = clean_boxes(xywh, self._sizes[img_idx][:, ::-1].astype(np.float64))
        labels = np.array([self.cat_id_to_label[a["category_id"]] for a in anns], dtype=np.int64)
        crowd = np.array([bool(a["iscrowd"]) for a in anns], dtype=bool)
        dropped = len(anns) - int(keep.sum())
        if dropped or counts["clipped"]:
            reasons = ", ".join(f"{n} {r}" for r, n in counts.items() if n and r != "clipped")
            example = anns[int(np.flatnonzero(~keep)[0])]["id"] if dropped else None
            log.warning("%s: dropped %d of %d boxes (%s%s); clipped %d boxes partly outside their image",
                        self.ann_file, dropped, len(anns), reasons or "none",
                        f"; e.g. annotation id {example}" if dropped else "", counts["clipped"])
        order = np.argsort(img_idx[keep], kind="stable")
        self._boxes = boxes[keep][order].astype(np.float32)
        self._labels, self._crowd = labels[keep][order], crowd[keep][order]
        per_image = np.bincount(img_idx[keep], minlength=len(self.image_ids))
        self._offsets = np.concatenate([[0], np.cumsum(per_image)])

    def class_counts(self) -> np.ndarray:
        """Non-crowd boxes per label [K] (after dropping degenerate boxes)."""
        return np.bincount(self._labels[~self._crowd], minlength=self.num_classes).astype(np.int64)

    def __len__(self) -> int:
        return len(self.image_ids)

    def _load_image(self, i: int) -> np.ndarray:
        path = os.path.join(self.img_dir, self._file_names[i])
        image = load_rgb(path)
        h, w = (int(v) for v in self._sizes[i])
        if image.shape[:2] != (h, w):
            raw = load_rgb(path, exif=False)
            if raw.shape[:2] != (h, w):
                raise DatasetError(f"{path}: the image is width={image.shape[1]}, height={image.shape[0]} but "
                                   f"{self.ann_file} says width={w}, height={h} (image id {self.image_ids[i]})")
            if not self._exif_warned:
                log.warning("%s: annotations match the stored pixels, not the EXIF orientation; ignoring EXIF "
                            "orientation for such images", path)
                self._exif_warned = True
            image = raw
        return image

    def __getitem__(self, i: int) -> dict:
        image = self._load_image(i)
        orig_h, orig_w = image.shape[:2]
        lo, hi = self._offsets[i], self._offsets[i + 1]
        boxes, labels, crowd = self._boxes[lo:hi].copy(), self._labels[lo:hi].copy(), self._crowd[lo:hi].copy()
        if self.transform is not None:
            image, boxes, labels, crowd = self.transform(image, boxes, labels, crowd)
        return {"image": image, "boxes": boxes, "labels": labels, "crowd": crowd, "image_id": int(self.image_ids[i]),
                "orig_size": (orig_h, orig_w), "scale": (image.shape[0] / orig_h, image.shape[1] / orig_w)}

    def __repr__(self) -> str:
        return (f"CocoDetection({self.ann_file!r}, {len(self)} images, {len(self._boxes)} boxes, "
                f"{self.num_classes} classes, transform={self.transform!r})")
