"""A trained detector from a checkpoint: model + anchors + post-processing, rebuilt from the checkpoint's
own resolved config, plus the label-map check that lets it run on another dataset.

``load_detector(path)`` needs nothing but the file: the architecture comes from ``ckpt["config"]``
(built with ``hydra.utils.instantiate``; backbone ``weights`` forced to None since the checkpoint
holds every weight, so nothing is downloaded), ``num_classes`` from ``ckpt["label_map"]``, and the
resize from the training data config (overridable).
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from tqdm import tqdm

from retinanet.checkpoint import load_checkpoint
from retinanet.data.build import eval_resize
from retinanet.data.collate import Batch
from retinanet.data.image_io import IMAGE_EXTENSIONS, ImageReadError, load_rgb
from retinanet.data.transforms import build_transforms
from retinanet.errors import UserError

log = logging.getLogger(__name__)




class InputError(UserError):
    """The ``input`` of inference names no image."""


class CheckpointError(UserError):
    """The checkpoint is missing, unreadable or not a RetinaNet checkpoint of this project."""


class LabelMapError(UserError):
    """The dataset's classes are not the classes the checkpoint was trained on."""


@dataclass
class Detector:
    """Model, anchors and post-processor of one checkpoint; ``detector(batch)`` -> detections per image."""

    model: torch.nn.Module
    anchors: object
    postprocess: object
    class_names: list[str]
    category_ids: list[int]
    min_size: int | None
    max_size: int | None
    size_divisible: int
    device: torch.device
    config: dict = field(repr=False, default_factory=dict)

    def transform(self):
        """The evaluation transform: the resize the model was trained with."""
        return build_transforms(False, min_size=self.min_size, max_size=self.max_size)

    @torch.no_grad()
    def __call__(self, batch: Batch) -> list[dict]:
        """Detections (``boxes`` xyxy in original image pixels, ``scores``, ``labels``) for a collated batch."""
        images = batch.images.to(self.device)
        out = self.model(images)
        anchors = self.anchors(out.feature_shapes, tuple(images.shape[-2:]), self.device)
        per_level = self.anchors.num_anchors_per_level(out.feature_shapes)
        dets = self.postprocess(out.cls_logits.float(), out.box_deltas.float(), anchors, per_level,
                                batch.image_sizes.to(self.device), batch.scales.to(self.device))
        return [{k: v.cpu() for k, v in d.items()} for d in dets]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"device={name!r} is not a device name (auto, cpu, cuda, cuda:N)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name!r} but CUDA is not available on this machine; use device=cpu")
    return device


def _read(path) -> dict:
    try:
        ckpt = load_checkpoint(path)
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint={str(path)!r} does not exist (give the best.pt or last.pt of a "
                              "training run, e.g. checkpoint=outputs/shapes/<date>/best.pt)") from err
    except ValueError as err:
        raise CheckpointError(str(err)) from err
    for key in ("config", "label_map"):
        if key not in ckpt:
            raise CheckpointError(f"checkpoint {str(path)!r} has no {key!r} entry (not written by scripts/train.py)")
    return ckpt


def load_detector(path, device: str | torch.device = "cpu", min_size: int | None = None,
                  max_size: int | None = None, **postprocess_overrides) -> Detector:
    """Rebuild the detector of checkpoint ``path``; ``postprocess_overrides`` (e.g. ``score_thresh``) that are
    not None replace the checkpoint's ``postprocess`` settings, ``min_size``/``max_size`` its resize."""
    ckpt = _read(path)
    cfg, label_map = ckpt["config"], ckpt["label_map"]
    device = device if isinstance(device, torch.device) else resolve_device(str(device))
    anchors = instantiate(cfg["model"]["anchors"])
    net_cfg = {**cfg["model"]["net"], "weights": None}  # every weight comes from the checkpoint
    model = instantiate(net_cfg, num_classes=len(label_map["class_names"]),
                        num_anchors=anchors.num_anchors_per_location)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {str(path)!r}: weights do not fit the model of its own config "
                              f"({str(err)[:300]})") from err
    model.to(device).eval()
    post_cfg = {**cfg["postprocess"], **{k: v for k, v in postprocess_overrides.items() if v is not None}}
    data = cfg["data"]
    eval_min, eval_max = eval_resize(data)
    return Detector(model=model, anchors=anchors, postprocess=instantiate(post_cfg),
                    class_names=list(label_map["class_names"]),
                    category_ids=[int(c) for c in label_map["category_ids"]],
                    min_size=min_size if min_size is not None else eval_min,
                    max_size=max_size if max_size is not None else eval_max,
                    size_divisible=int(data["size_divisible"]), device=device, config=cfg)


def dataset_category_ids(detector: Detector, dataset) -> list[int]:
    """The dataset's category id for each model label (``label_to_cat_id`` for ``to_coco_results``).

    Same (id, name) pairs: used as they are. Same class names under other ids (e.g. converted
    separately): matched by name. Anything else raises ``LabelMapError`` naming the differences.
    """
    ours = list(zip(detector.category_ids, detector.class_names))
    theirs = list(zip(dataset.label_to_cat_id, dataset.class_names))
    if ours == theirs:
        return list(detector.category_ids)
    by_name = dict(zip(dataset.class_names, dataset.label_to_cat_id))
    if sorted(detector.class_names) == sorted(dataset.class_names) and len(by_name) == len(dataset.class_names):
        log.info("dataset %s uses other category ids for the checkpoint's classes; matched by name",
                 dataset.ann_file)
        return [by_name[name] for name in detector.class_names]
    missing = sorted(set(detector.class_names) - set(dataset.class_names))
    extra = sorted(set(dataset.class_names) - set(detector.class_names))
    raise LabelMapError(
        f"{dataset.ann_file}: its classes do not match the checkpoint's. Checkpoint (id, name): {ours}; dataset: "
        f"{theirs}. Missing from the dataset: {missing or 'none'}; not known to the checkpoint: {extra or 'none'}. "
        "Evaluate on data annotated with the same classes (names must match; ids may differ).")


def detect(detector: Detector, loader, progress: bool = True, desc: str = "detect") -> tuple[list[dict], list[int]]:
    """Run ``detector`` over a loader of collated batches -> (detections per image, image ids).

    Each detection dict also holds ``orig_size`` (h, w) of its image.
    """
    detections, image_ids = [], []
    for batch in tqdm(loader, desc=desc, disable=not progress, dynamic_ncols=True):
        if len(batch) == 0:  # every image of the batch was skipped
            continue
        for det, size in zip(detector(batch), batch.orig_sizes.tolist()):
            det["orig_size"] = tuple(size)  # (h, w) of the image file
            detections.append(det)
        image_ids.extend(batch.image_ids.tolist())
    return detections, image_ids


class ImageFiles(torch.utils.data.Dataset):
    """Plain image files as ``Collate`` samples (no boxes); ``image_id`` = index in ``paths``.

    An unreadable file gives a ``{"skipped": True}`` marker (dropped by ``SkippingCollate``) and a warning.
    """

    def __init__(self, paths: list, transform):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        try:
            image = load_rgb(self.paths[i])
        except ImageReadError as err:
            log.warning("skipping %s", err)
            return {"skipped": True, "image_id": i}
        h, w = image.shape[:2]
        image, boxes, labels, crowd = self.transform(image, np.zeros((0, 4), np.float32), np.zeros(0, np.int64),
                                                     np.zeros(0, bool))
        return {"image": image, "boxes": boxes, "labels": labels, "crowd": crowd, "image_id": i,
                "orig_size": (h, w), "scale": (image.shape[0] / h, image.shape[1] / w)}


def find_images(spec: str, exclude: str | os.PathLike | None = None) -> tuple[list[Path], Path, list[Path]]:
    """Images named by ``spec`` -> (image paths sorted, the folder their names are relative to, skipped files).

    ``spec``: an image file (any extension: decoded by content), a folder (searched recursively for
    ``IMAGE_EXTENSIONS``; other files are returned as skipped) or a glob (``photos/**/*.jpg``).
    Files under ``exclude`` (the output folder) are never taken.
    """
    spec = os.fspath(spec)
    path = Path(spec)
    if path.is_file():
        return [path], path.parent, []
    if path.is_dir():
        root, files = path, sorted(p for p in path.rglob("*") if p.is_file())
        what = f"folder {spec!r}"
    elif glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        root = Path(os.path.commonpath([str(p.parent) for p in files])) if files else Path(".")
        what = f"glob {spec!r}"
    else:
        raise InputError(f"input={spec!r} does not exist (give an image file, a folder or a glob)")
    if exclude is not None:
        out = Path(exclude).resolve()
        files = [p for p in files if out not in p.resolve().parents]
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    skipped = [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
    if not images:
        raise InputError(f"input: {what} holds no image file ({len(skipped)} other files; image extensions: "
                         f"{' '.join(IMAGE_EXTENSIONS)})")
    return images, root, skipped
