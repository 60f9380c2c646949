"""COCO-format detection dataset: validated JSON in, RGB image + xyxy boxes + contiguous labels out.

The annotation file is read once with ``json`` and checked; pycocotools then indexes the checked
records (``self.coco``, used for evaluation). Labels are 0..K-1 in order of sorted category id.

Bad input and ``on_error``:

- always fatal (nothing sensible to skip): a missing or unreadable annotation file, malformed
  JSON, a wrong top-level structure, a bad category record, a missing image folder;
- ``on_error="raise"`` (default): any bad image or annotation record (missing field, duplicate
  id, unknown image or category, malformed bbox, ``file_name`` escaping the image folder), a
  missing image file (checked when the dataset is built) and an unreadable or wrongly sized
  image raise a ``DatasetError`` / ``ImageReadError`` naming the file, the record, the field and
  the value: when the dataset is built with ``verify`` (``data.verify``, ``retinanet.data.verify``:
  every image decoded, or its header read), otherwise when the image is loaded. A truncated JPEG
  is decoded to what it holds, with a warning (``image_io``);
- ``on_error="skip"``: such records are dropped with one warning per reason (count and first
  example) when the dataset is built, and such images are skipped when loaded: the dataset
  returns the next readable image (``skip_policy="replace"``, training) or a ``{"skipped": True}``
  marker that the loader's collate drops (``skip_policy="drop"``, evaluation). Load-time skips
  are flagged in shared memory (visible across DataLoader workers) and ``report_skipped()``
  logs them at the end of each pass. In evaluation (``"drop"``) an image whose file is missing
  stays in the ground truth like one that cannot be decoded: its objects count as missed.

Boxes (both modes): non-finite, zero / negative size and entirely-outside boxes are dropped,
boxes partly outside their image are clipped, and one warning summarises the counts.
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

from retinanet.boxes import xywh_to_xyxy, xyxy_to_xywh
from retinanet.data.image_io import ImageReadError, load_rgb, note_truncated
from retinanet.data.verify import check_verify, verify_images
from retinanet.errors import ConfigError, UserError

log = logging.getLogger(__name__)

REQUIRED_FIELDS = {
    "images": ("id", "file_name", "width", "height"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}
ON_ERROR = ("raise", "skip")
SKIP_POLICIES = ("replace", "drop")
_UNREADABLE, _WRONG_SIZE = 1, 2  # load-time failure codes kept in shared memory
_FAILURE_NAMES = {_UNREADABLE: "unreadable", _WRONG_SIZE: "size differs from the annotation file"}


class DatasetError(UserError):
    """The annotation file or image folder is wrong; the message names the file, record and field."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR:
        raise ConfigError(f"data.on_error={on_error!r} must be one of {list(ON_ERROR)}")
    return on_error


class Problems:
    """Bad records of one file: raised at once (``raise``) or counted per reason (``skip``)."""

    def __init__(self, source: str, on_error: str = "raise"):
        self.source, self.on_error = source, check_on_error(on_error)
        self.counts: dict[str, int] = {}
        self.examples: dict[str, str] = {}

    def __call__(self, reason: str, message: str) -> None:
        message = f"{self.source}: {message}"
        if self.on_error == "raise":
            raise DatasetError(message)
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.examples.setdefault(reason, message)

    def warn(self) -> None:
        for reason, n in self.counts.items():
            log.warning("data.on_error=skip: skipped %d %s; first: %s", n, reason, self.examples[reason])


def _load_json(ann_file: str) -> dict:
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
    for key in REQUIRED_FIELDS:
        if not isinstance(data[key], list):
            raise DatasetError(f"{ann_file}: '{key}' must be a list, got {type(data[key]).__name__}")
    return data


def _shaped_records(key: str, records: list, problems: Problems) -> list[dict]:
    """Records that are objects with every required field and an integer id (others reported)."""
    kept = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            problems(f"{key} that are not objects", f"{key}[{i}] must be an object, got {str(rec)[:60]!r}")
            continue
        absent = [f for f in REQUIRED_FIELDS[key] if f not in rec]
        if absent:
            problems(f"{key} with missing fields", f"{key}[{i}] (id={rec.get('id')!r}) is missing field(s) {absent}")
        elif not _is_int(rec["id"]):
            problems(f"{key} with a non-integer id", f"{key}[{i}] field 'id' must be an integer, got {rec['id']!r}")
        else:
            kept.append({**rec, "_index": i})
    return kept


def _unique(key: str, records: list[dict], problems: Problems, drop_all: bool) -> list[dict]:
    """Records with a unique id; a repeated id drops the later records (or all of them: ``drop_all``).
    Every dropped record is reported (counted) once."""
    where: dict = {}
    for rec in records:
        where.setdefault(rec["id"], []).append(rec["_index"])
    if all(len(v) == 1 for v in where.values()):
        return records
    kept = []
    for rec in records:
        indices = where[rec["id"]]
        if len(indices) > 1 and (drop_all or rec["_index"] != indices[0]):
            what = f"{key}{indices} share the id {rec['id']}" if drop_all else \
                f"{key}[{rec['_index']}] has a duplicate id {rec['id']} (first: {key}[{indices[0]}])"
            problems(f"{key} with a duplicate id", f"{what} (ids must be unique in '{key}')")
        else:
            kept.append(rec)
    return kept


def _image_problem(img: dict) -> tuple[str, str] | None:
    where = f"images[{img['_index']}] (id={img['id']})"
    for field in ("width", "height"):
        if not _is_number(img[field]) or img[field] <= 0:
            return "images with a bad size", f"{where} field '{field}' must be a positive number, got {img[field]!r}"
    name = img["file_name"]
    if not isinstance(name, str) or not name:
        return "images with a bad file_name", f"{where} field 'file_name' must be a non-empty string, got {name!r}"
    norm = os.path.normpath(name)
    if os.path.isabs(name) or norm == os.pardir or norm.startswith(os.pardir + os.sep):
        return "images outside the image folder", (f"{where} field 'file_name'={name!r} points outside the image "
                                                   "folder; file names must be relative paths inside it")
    return None


def _annotation_problem(ann: dict, image_ids: set, dropped_images: set, cat_ids: set) -> tuple[str, str] | None:
    where = f"annotations[{ann['_index']}] (id={ann['id']})"
    if _is_int(ann["image_id"]) and ann["image_id"] in dropped_images:
        return "annotations of skipped images", f"{where} belongs to skipped image id {ann['image_id']}"
    if not _is_int(ann["image_id"]) or ann["image_id"] not in image_ids:
        return ("annotations of unknown images",
                f"{where} field 'image_id'={ann['image_id']!r} is not the id of any image")
    if not _is_int(ann["category_id"]) or ann["category_id"] not in cat_ids:
        return ("annotations of unknown categories",
                f"{where} field 'category_id'={ann['category_id']!r} is not one of the categories {sorted(cat_ids)}")
    bbox = ann["bbox"]
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        return ("annotations with a malformed bbox",
                f"{where} field 'bbox'={bbox!r} must be a list of 4 numbers [x, y, width, height]")
    if ann.get("iscrowd", 0) not in (0, 1):
        return "annotations with a bad iscrowd", f"{where} field 'iscrowd'={ann['iscrowd']!r} must be 0 or 1"
    return None


def _check_categories(ann_file: str, categories: list) -> list[dict]:
    """Categories are always checked strictly: the label map depends on every one of them."""
    cats = _unique("categories", _shaped_records("categories", categories, Problems(ann_file)), Problems(ann_file),
                   drop_all=False)
    for cat in cats:
        if not isinstance(cat["name"], str):
            raise DatasetError(f"{ann_file}: categories[{cat['_index']}] (id={cat['id']}) field 'name' must be a "
                               f"string, got {cat['name']!r}")
    return cats


def read_coco_json(ann_file: str, on_error: str = "raise", problems: Problems | None = None) -> dict:
    """Load and validate a COCO detection JSON; bad image / annotation records raise or go to ``problems``.

    Returns the data with only the valid records.
    """
    problems = problems if problems is not None else Problems(ann_file, on_error)
    data = _load_json(ann_file)
    cats = _check_categories(ann_file, data["categories"])
    shaped = _shaped_records("images", data["images"], problems)
    images = []
    for img in _unique("images", shaped, problems, drop_all=True):
        bad = _image_problem(img)
        if bad:
            problems(*bad)
        else:
            images.append(img)
    dropped = {r["id"] for r in data["images"] if isinstance(r, dict) and _is_int(r.get("id"))} - {
        img["id"] for img in images}
    image_ids, cat_ids = {img["id"] for img in images}, {c["id"] for c in cats}
    anns = []
    for ann in _unique("annotations", _shaped_records("annotations", data["annotations"], problems), problems,
                       drop_all=False):
        bad = _annotation_problem(ann, image_ids, dropped, cat_ids)
        if bad:
            problems(*bad)
        else:
            anns.append(ann)
    strip = lambda recs: [{k: v for k, v in r.items() if k != "_index"} for r in recs]  # noqa: E731
    return {**data, "images": strip(images), "annotations": strip(anns), "categories": strip(cats)}


def clean_boxes(xywh: np.ndarray, image_wh: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """COCO xywh [N, 4] -> (xyxy [N, 4] clipped to image_wh [N, 2], keep [N] bool, counts per reason)."""
    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.isfinite(xywh).all(axis=1)
        sized = finite & (xywh[:, 2] > 0) & (xywh[:, 3] > 0)
        xyxy = xywh_to_xyxy(xywh)
        clipped = np.clip(xyxy, 0, np.concatenate([image_wh, image_wh], axis=1))
        inside = sized & (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
        was_clipped = inside & (clipped != xyxy).any(axis=1)
    counts = {"non-finite": int((~finite).sum()), "zero or negative width/height": int((finite & ~sized).sum()),
              "entirely outside the image": int((sized & ~inside).sum()), "clipped": int(was_clipped.sum())}
    return clipped, inside, counts


class CocoDetection(torch.utils.data.Dataset):
    """COCO-format dataset; ``transform(image, boxes, labels, crowd)`` as in ``transforms.DetectionTransform``.

    ``on_error`` and ``skip_policy``: see the module docstring. ``skipped`` counts the records
    dropped when the dataset was built (per reason); ``load_skipped`` counts images skipped at
    load time over all passes reported so far.
    """

    def __init__(self, ann_file, img_dir, transform=None, on_error: str = "raise", skip_policy: str = "replace",
                 verify: bool | str = False, progress: bool = True):
        self.ann_file, self.img_dir, self.transform = os.fspath(ann_file), os.fspath(img_dir), transform
        self.on_error, verify = check_on_error(on_error), check_verify(verify)
        if skip_policy not in SKIP_POLICIES:
            raise ValueError(f"skip_policy={skip_policy!r} must be one of {list(SKIP_POLICIES)}")
        self.skip_policy = skip_policy
        problems = Problems(self.ann_file, on_error)
        data = read_coco_json(self.ann_file, problems=problems)
        if not os.path.isdir(self.img_dir):
            raise DatasetError(f"image folder not found: {self.img_dir} (images of {self.ann_file})")
        data = self._drop_missing_files(data, problems)
        problems.warn()
        self.skipped = dict(problems.counts)
        cats = sorted(data["categories"], key=lambda c: c["id"])
        self.label_to_cat_id = [c["id"] for c in cats]
        self.cat_id_to_label = {c: i for i, c in enumerate(self.label_to_cat_id)}
        self.class_names = [c["name"] for c in cats]
        images = data["images"]
        self.image_ids = [img["id"] for img in images]
        self._file_names = [img["file_name"] for img in images]
        self._sizes = np.array([[img["height"], img["width"]] for img in images], dtype=np.int64).reshape(-1, 2)
        kept = self._index_boxes(data["annotations"])
        # COCOeval's ground truth is what was validated: dropped boxes are gone, clipped ones clipped
        self.coco = COCO()
        self.coco.dataset = {**data, "annotations": kept}
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco.createIndex()
        self._exif_warned = False
        self._square_exif = True  # square images with a 90-degree EXIF rotation: rotated (see _verify)
        if verify and on_error == "raise":
            self._verify(decode=verify is True, progress=progress)
        # one flag per image, in shared memory so that DataLoader workers' skips are seen here
        self._failed = torch.zeros(len(images), dtype=torch.uint8).share_memory_() if on_error == "skip" else None
        self._failure_logged = False
        self.load_skipped = 0

    def _verify(self, decode: bool, progress: bool) -> None:
        """Every image checked now (``retinanet.data.verify``): unusable files raise one error listing them,
        truncated JPEGs get one warning, and the EXIF rotation of square images follows the other images'."""
        paths = [self.image_path(i) for i in range(len(self))]
        checks = verify_images(paths, self._sizes, decode, f"checking {os.path.basename(self.ann_file)}", progress)
        bad = [(name, c.problem) for name, c in zip(self._file_names, checks) if c.problem]
        if bad:
            listed = "; ".join(f"{name}: {problem}" for name, problem in bad[:5]) + (" ..." if len(bad) > 5 else "")
            raise DatasetError(
                f"{len(bad)} of {len(self)} images of {self.ann_file} (in {self.img_dir}) cannot be used: {listed}. "
                "Replace or fix them (or remove them from the annotation file); or go on without them with "
                "data.on_error=skip (left out of training, counted as missed in evaluation); data.verify=false "
                "skips this check")
        truncated = [name for name, c in zip(self._file_names, checks) if c.truncated]
        if truncated:
            log.warning("%d of %d images of %s are truncated JPEGs, decoded to what they hold (the rest grey): %s%s",
                        len(truncated), len(self), self.ann_file, ", ".join(truncated[:10]),
                        " ..." if len(truncated) > 10 else "")
            for path, c in zip(paths, checks):
                if c.truncated:
                    note_truncated(path, quiet=True)
        self._square_exif = self._exif_convention([c.rotated for c in checks])

    def _exif_convention(self, rotated: list) -> bool:
        """Whether square images with a 90-degree EXIF rotation are rotated: as the annotations of the non-square
        ones show (their size matches one orientation only), the EXIF rotation when none shows it."""
        upright, stored, square = (sum(r == k for r in rotated) for k in ("upright", "stored", "square"))
        follow = stored <= upright
        if square and (upright or stored):
            log.info("%s: %d square images with an EXIF rotation are read %s, as %d of the %d other rotated images "
                     "are annotated", self.ann_file, square, "rotated" if follow else "as stored",
                     upright if follow else stored, upright + stored)
        elif square:
            log.warning("%s: %d square images carry a 90-degree EXIF rotation and no other image shows whether the "
                        "annotations follow it: they are read rotated, as image viewers show them", self.ann_file,
                        square)
        return follow

    @property
    def num_classes(self) -> int:
        return len(self.label_to_cat_id)

    def _drop_missing_files(self, data: dict, problems: Problems) -> dict:
        """The validation pass over image files (``os.path.exists`` only: cheap even for COCO). In evaluation
        (``skip_policy="drop"``) a missing file is kept: skipped when loaded, its objects count as missed."""
        missing = [img for img in data["images"] if not os.path.exists(os.path.join(self.img_dir, img["file_name"]))]
        if not missing:
            return data
        if self.on_error == "raise":
            names = [img["file_name"] for img in missing[:5]]
            raise DatasetError(f"{len(missing)} of {len(data['images'])} images listed in {self.ann_file} are "
                               f"missing from {self.img_dir}, e.g. {names} (data.on_error=skip leaves them out)")
        if self.skip_policy == "drop":
            for img in missing:
                problems("images whose file is missing (kept in the ground truth: their objects count as missed)",
                         f"image id {img['id']}: field 'file_name'={img['file_name']!r} not found in {self.img_dir}")
            return data
        for img in missing:
            problems("images whose file is missing", f"image id {img['id']}: field 'file_name'={img['file_name']!r} "
                                                     f"not found in {self.img_dir}")
        gone = {img["id"] for img in missing}
        anns = [a for a in data["annotations"] if a["image_id"] not in gone]
        for a in data["annotations"]:
            if a["image_id"] in gone:
                problems("annotations of images whose file is missing",
                         f"annotation id {a['id']} belongs to image id {a['image_id']}")
        return {**data, "images": [img for img in data["images"] if img["id"] not in gone], "annotations": anns}

    def _index_boxes(self, anns: list) -> list[dict]:
        """Per-image boxes as flat arrays sorted by image, with offsets (cheap to share with workers).

        Returns the annotation records that were kept, with their bbox as cleaned (clipped to the image)
        and ``iscrowd`` / ``area`` filled in where absent: the ground truth COCOeval and the pictures use."""
        row = {img_id: i for i, img_id in enumerate(self.image_ids)}
        img_idx = np.array([row[a["image_id"]] for a in anns], dtype=np.int64)
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        boxes, keep, counts = clean_boxes(xywh, self._sizes[img_idx][:, ::-1].astype(np.float64))
        labels = np.array([self.cat_id_to_label[a["category_id"]] for a in anns], dtype=np.int64)
        crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
        dropped = len(anns) - int(keep.sum())
        if dropped or counts["clipped"]:
            reasons = ", ".join(f"{n} {r}" for r, n in counts.items() if n and r != "clipped")
            example = anns[int(np.flatnonzero(~keep)[0])]["id"] if dropped else None
            log.warning("%s: dropped %d of %d boxes (%s%s); clipped %d boxes partly outside their image",
                        self.ann_file, dropped, len(anns), reasons or "none",
                        f"; e.g. annotation id {example}" if dropped else "", counts["clipped"])
        self.box_counts = {"total": len(anns), "dropped": dropped, **counts}
        order = np.argsort(img_idx[keep], kind="stable")
        self._boxes = boxes[keep][order].astype(np.float32)
        self._labels, self._crowd = labels[keep][order], crowd[keep][order]
        per_image = np.bincount(img_idx[keep], minlength=len(self.image_ids))
        self._offsets = np.concatenate([[0], np.cumsum(per_image)])
        kept = []
        for ann, bbox in zip((a for a, k in zip(anns, keep) if k), xyxy_to_xywh(boxes[keep].astype(np.float64)).tolist()):
            area = ann.get("area") if bbox == [float(v) for v in ann["bbox"]] else None  # a clipped box: its own area
            kept.append({**ann, "bbox": bbox, "iscrowd": int(ann.get("iscrowd", 0)),
                         "area": float(area) if area is not None else bbox[2] * bbox[3]})
        return kept

    def class_counts(self) -> np.ndarray:
        """Non-crowd boxes per label [K] (after dropping degenerate boxes)."""
        return np.bincount(self._labels[~self._crowd], minlength=self.num_classes).astype(np.int64)

    def boxes_per_image(self) -> np.ndarray:
        """Non-crowd boxes per image [N] (after dropping degenerate boxes)."""
        image_of_box = np.repeat(np.arange(len(self)), np.diff(self._offsets))  # [num boxes]
        return np.bincount(image_of_box[~self._crowd], minlength=len(self)).astype(np.int64)

    def crowd_count(self) -> int:
        return int(self._crowd.sum())

    def annotations(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Boxes xyxy [N, 4] (original pixels), labels [N] and crowd [N] of image ``i``, without loading it."""
        lo, hi = self._offsets[i], self._offsets[i + 1]
        return self._boxes[lo:hi].copy(), self._labels[lo:hi].copy(), self._crowd[lo:hi].copy()

    def image_size(self, i: int) -> tuple[int, int]:
        """(h, w) of image ``i`` as given in the annotation file."""
        return int(self._sizes[i, 0]), int(self._sizes[i, 1])

    def image_path(self, i: int) -> str:
        return os.path.join(self.img_dir, self._file_names[i])

    def __len__(self) -> int:
        return len(self.image_ids)

    def load_image(self, i: int) -> np.ndarray:
        """Image ``i`` as RGB uint8 [H, W, 3], oriented like its annotations (no transform)."""
        path = self.image_path(i)
        h, w = self.image_size(i)
        image = load_rgb(path, exif=self._square_exif or h != w)
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

    def _sample(self, i: int) -> dict:
        image = self.load_image(i)
        orig_h, orig_w = image.shape[:2]
        boxes, labels, crowd = self.annotations(i)
        if self.transform is not None:
            image, boxes, labels, crowd = self.transform(image, boxes, labels, crowd)
        return {"image": image, "boxes": boxes, "labels": labels, "crowd": crowd, "image_id": int(self.image_ids[i]),
                "orig_size": (orig_h, orig_w), "scale": (image.shape[0] / orig_h, image.shape[1] / orig_w)}

    def __getitem__(self, i: int) -> dict:
        if self.on_error == "raise":
            return self._sample(i)
        for attempt in range(len(self)):
            j = (i + attempt) % len(self)
            try:
                return self._sample(j)
            except (ImageReadError, DatasetError) as err:
                self._note_failure(j, err)
                if self.skip_policy == "drop":
                    return {"skipped": True, "image_id": int(self.image_ids[j])}
        raise DatasetError(f"none of the {len(self)} images of {self.ann_file} in {self.img_dir} can be read")

    def _note_failure(self, i: int, err: Exception) -> None:
        self._failed[i] = _UNREADABLE if isinstance(err, ImageReadError) else _WRONG_SIZE
        level = logging.DEBUG if self._failure_logged else logging.WARNING  # once per process, the rest at the end
        log.log(level, "data.on_error=skip: skipping image id %d: %s", self.image_ids[i], err)
        self._failure_logged = True

    def report_skipped(self) -> list[str]:
        """Log (and forget) the images skipped at load time since the last call; returns their file names.

        Called by the loader (``retinanet.data.build``) when a pass over the data ends.
        """
        if self._failed is None:
            return []
        failed = torch.nonzero(self._failed).flatten().tolist()
        if not failed:
            return []
        names = [self._file_names[i] for i in failed]
        listed = ", ".join(f"{self._file_names[i]} ({_FAILURE_NAMES[int(self._failed[i])]})" for i in failed[:10])
        log.warning("data.on_error=skip: %d of %d images of %s could not be loaded in this pass and were skipped: "
                    "%s%s", len(failed), len(self), self.ann_file, listed, " ..." if len(failed) > 10 else "")
        self.load_skipped += len(failed)
        self._failed.zero_()
        return names

    def __repr__(self) -> str:
        return (f"CocoDetection({self.ann_file!r}, {len(self)} images, {len(self._boxes)} boxes, "
                f"{self.num_classes} classes, on_error={self.on_error!r}, transform={self.transform!r})")
