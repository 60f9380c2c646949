"""``Detector``: the one way images become detections in this project.

Model + anchors + post-processing + the evaluation resize + the label map (+ the memory layout the model was
trained with, and the precision this device computes it best in: ``runtime.inference_dtype``). The trainer's
validation, ``retinanet-evaluate``, ``retinanet-infer``, the benchmarks and export all go through it:

    detector = Detector.from_checkpoint("outputs/shapes/<date>/best.pt", device="cpu")
    result = detector.predict("photo.jpg")          # or a PIL image, an RGB array, or a list of them
    result["boxes"], result["scores"], result["labels"], result["class_names"]

``from_checkpoint`` needs nothing but the file: the architecture comes from the checkpoint's resolved
config (backbone ``weights`` forced to None: every weight is in the checkpoint, nothing is downloaded),
the weights are the ones that scored (the EMA weights when the run kept an EMA), ``num_classes`` and
the class names come from its label map.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from tqdm import tqdm

from retinanet.checkpoint import CheckpointError, checkpoint_weights, load_checkpoint
from retinanet.data.build import eval_resize
from retinanet.data.collate import Batch, Collate
from retinanet.data.image_io import load_rgb, to_rgb_array
from retinanet.data.transforms import build_transforms
from retinanet.errors import UserError
from retinanet.runtime import autocast, inference_dtype, resolve_device

log = logging.getLogger(__name__)


class LabelMapError(UserError):
    """The dataset's classes are not the classes the checkpoint was trained on."""


def _plain(cfg) -> dict:
    """A resolved plain dict of a config (DictConfig or dict)."""
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


@dataclasses.dataclass
class Detector:
    """Model, anchors and post-processor of one trained detector, with its resize and class names."""

    model: torch.nn.Module
    anchors: object                      # retinanet.anchors.AnchorGenerator
    postprocess: object                  # retinanet.postprocess.PostProcessor
    class_names: list[str]
    category_ids: list[int]              # the dataset category id of each label 0..K-1
    min_size: int | None                 # evaluation resize: shorter side ...
    max_size: int | None                 # ... and cap on the longer side
    size_divisible: int
    device: torch.device
    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False
    config: dict = dataclasses.field(repr=False, default_factory=dict)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, cfg, label_map: Mapping, device="cpu", model: torch.nn.Module | None = None,
                    min_size: int | None = None, max_size: int | None = None,
                    postprocess: Mapping | None = None, quiet: bool = False, precision="auto") -> "Detector":
        """The detector a training config describes. ``model``: an existing network (the one being trained,
        or its EMA copy); None builds one from ``cfg.model.net`` without pretrained weights. ``postprocess``:
        settings that replace the config's; ``min_size`` / ``max_size``: replace its evaluation resize.
        ``precision``: ``auto`` (what this device computes best for the config's ``trainer.precision``, whatever
        device trained it), ``32``, ``bf16`` or ``fp16`` (``runtime.inference_dtype``); ``quiet``: the choice is not
        logged."""
        cfg = _plain(cfg)
        device = resolve_device(device)
        anchors = instantiate(cfg["model"]["anchors"])
        if model is None:
            net_cfg = {**cfg["model"]["net"], "weights": None}  # every weight comes from a checkpoint
            model = instantiate(net_cfg, num_classes=len(label_map["class_names"]),
                                num_anchors=anchors.num_anchors_per_location)
        trainer = cfg.get("trainer", {})
        dtype = inference_dtype(precision, device, trainer.get("precision", "32"), quiet=quiet)
        channels_last = bool(trainer.get("channels_last", False))
        model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        eval_min, eval_max = eval_resize(cfg["data"])
        post_cfg = {**cfg["postprocess"], **{k: v for k, v in (postprocess or {}).items() if v is not None}}
        return cls(model=model, anchors=anchors, postprocess=instantiate(post_cfg),
                   class_names=list(label_map["class_names"]),
                   category_ids=[int(c) for c in label_map["category_ids"]],
                   min_size=min_size if min_size is not None else eval_min,
                   max_size=max_size if max_size is not None else eval_max,
                   size_divisible=int(cfg["data"]["size_divisible"]), device=device, autocast_dtype=dtype,
                   channels_last=channels_last, config=cfg)

    @classmethod
    def from_checkpoint(cls, path, device="auto", min_size: int | None = None, max_size: int | None = None,
                        postprocess: Mapping | None = None, weights: str = "auto", ckpt: Mapping | None = None,
                        precision="auto") -> "Detector":
        """Rebuild the detector of checkpoint ``path`` (see the module docstring).

        ``weights``: ``auto`` (the EMA weights when the checkpoint has them: those scored and picked
        ``best.pt``), ``ema`` or ``model`` (the raw weights). ``ckpt``: the checkpoint already read from
        ``path`` (``load_checkpoint``), not read again. ``precision``: see ``from_config`` (``auto``: this device's
        best for how the checkpoint was trained; a ``16-mixed`` checkpoint runs on a CPU too).
        """
        ckpt = load_checkpoint(path) if ckpt is None else ckpt
        for key in ("config", "label_map"):
            if key not in ckpt:
                raise CheckpointError(f"checkpoint {str(path)!r} has no {key!r} entry (not written by "
                                      "retinanet-train)")
        state = checkpoint_weights(ckpt, weights, path)
        detector = cls.from_config(ckpt["config"], ckpt["label_map"], device, min_size=min_size, max_size=max_size,
                                   postprocess=postprocess, precision=precision)
        try:
            detector.model.load_state_dict(state)
        except RuntimeError as err:
            raise CheckpointError(f"checkpoint {str(path)!r}: weights do not fit the model of its own config "
                                  f"({str(err)[:300]})") from err
        detector.model.eval()
        return detector

    def with_model(self, model: torch.nn.Module) -> "Detector":
        """The same detector around another network of the same architecture (e.g. the EMA weights)."""
        return dataclasses.replace(self, model=model)

    # ------------------------------------------------------------------ running

    def transform(self):
        """The evaluation transform: the resize the detector evaluates at."""
        return build_transforms(False, min_size=self.min_size, max_size=self.max_size)

    def outputs(self, images: torch.Tensor):
        """Raw outputs of a padded uint8 batch ``[B, 3, H, W]`` on the device: ``(RetinaNetOutput in fp32,
        anchors [A_total, 4])``."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.autocast_dtype):
            out = self.model(images)
        out = out._replace(cls_logits=out.cls_logits.float(), box_deltas=out.box_deltas.float())
        return out, self.anchors(out.feature_shapes, tuple(images.shape[-2:]), self.device)

    @torch.no_grad()
    def detect_batch(self, batch: Batch, criterion=None) -> tuple[list[dict], dict | None]:
        """Detections of a collated batch (``boxes`` xyxy in original image pixels, ``scores``, ``labels``;
        on the CPU) and, with a ``criterion``, its losses from the same forward pass."""
        batch = batch.to(self.device, non_blocking=True)
        out, anchors = self.outputs(batch.images)
        losses = None
        if criterion is not None:
            losses = {k: float(v) for k, v in criterion(out.cls_logits, out.box_deltas, anchors, batch.gt_boxes,
                                                         batch.gt_labels, batch.gt_crowd).items()}
        per_level = self.anchors.num_anchors_per_level(out.feature_shapes)
        dets = self.postprocess(out.cls_logits, out.box_deltas, anchors, per_level, batch.image_sizes, batch.scales)
        return [{k: v.cpu() for k, v in d.items()} for d in dets], losses

    def detect(self, loader, progress: bool = True, desc: str = "detect", criterion=None
               ) -> tuple[list[dict], list[int], dict]:
        """Every image of ``loader`` -> ``(detections, image ids, mean losses)`` (losses: {} without a
        ``criterion``). Each detection also holds ``orig_size`` (h, w) of its image."""
        self.model.eval()
        return detect_loader(lambda batch: self.detect_batch(batch, criterion), loader, progress, desc)

    @torch.no_grad()
    def predict(self, images, batch_size: int = 8):
        """Detections of one image or a list of them: file paths, PIL images or RGB uint8 arrays ``[H, W, 3]``
        (grey ``[H, W]`` is expanded). Returns per image ``{"boxes" [N, 4] xyxy in the image's pixels, "scores"
        [N], "labels" [N], "class_names" [N]}`` (tensors on the CPU, sorted by score); a single input gives a
        single result.

        An image's detections do not depend on the others given with it: up to ``batch_size`` images of the same
        padded size run together (no image is padded to a larger neighbour's size), and the post-processing treats
        each image alone (docs/export_and_inference.md, "Batches")."""
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        transform, collate, div = self.transform(), Collate(self.size_divisible), self.size_divisible
        results = [None] * len(items)
        for start in range(0, len(items), batch_size):
            samples = [image_sample(transform, _as_rgb(item), i) for i, item in enumerate(items[start:start + batch_size])]
            groups = {}  # padded (H, W) -> samples of that size
            for sample in samples:
                h, w = sample["image"].shape[:2]
                groups.setdefault((-(-h // div), -(-w // div)), []).append(sample)
            for group in groups.values():
                dets, _ = self.detect_batch(collate(group))
                for sample, det in zip(group, dets):
                    det["class_names"] = [self.class_names[k] for k in det["labels"].tolist()]
                    results[start + sample["image_id"]] = det
        return results[0] if single else results

    # ------------------------------------------------------------------ datasets

    def dataset_category_ids(self, dataset) -> list[int]:
        """The dataset's category id for each label (``label_to_cat_id`` for COCO results).

        Same (id, name) pairs: used as they are. Same class names under other ids (e.g. converted
        separately): matched by name. Anything else raises ``LabelMapError`` naming the differences.
        """
        ours = list(zip(self.category_ids, self.class_names))
        theirs = list(zip(dataset.label_to_cat_id, dataset.class_names))
        if ours == theirs:
            return list(self.category_ids)
        by_name = dict(zip(dataset.class_names, dataset.label_to_cat_id))
        if sorted(self.class_names) == sorted(dataset.class_names) and len(by_name) == len(dataset.class_names):
            log.info("dataset %s uses other category ids for the checkpoint's classes; matched by name",
                     dataset.ann_file)
            return [by_name[name] for name in self.class_names]
        missing = sorted(set(self.class_names) - set(dataset.class_names))
        extra = sorted(set(dataset.class_names) - set(self.class_names))
        raise LabelMapError(
            f"{dataset.ann_file}: its classes do not match the checkpoint's. Checkpoint (id, name): {ours}; dataset: "
            f"{theirs}. Missing from the dataset: {missing or 'none'}; not known to the checkpoint: "
            f"{extra or 'none'}. Evaluate on data annotated with the same classes (names must match; ids may differ).")


def detect_loader(detect_batch, loader, progress: bool = True, desc: str = "detect") -> tuple[list[dict], list[int], dict]:
    """``detect_batch(batch) -> (detections, losses or None)`` over every batch of ``loader`` -> ``(detections,
    image ids, mean losses)``; each detection also holds ``orig_size`` (h, w). ``Detector.detect`` and the
    exported-model runner (``retinanet.deploy.onnx_detector``) share it."""
    detections, image_ids, sums, batches = [], [], {}, 0
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        if len(batch) == 0:  # every image of the batch was skipped
            continue
        dets, losses = detect_batch(batch)
        for det, size in zip(dets, batch.orig_sizes.tolist()):
            det["orig_size"] = tuple(size)
            detections.append(det)
        image_ids.extend(batch.image_ids.tolist())
        for k, v in (losses or {}).items():
            sums[k] = sums.get(k, 0.0) + v
        batches += 1
    return detections, image_ids, {k: v / max(1, batches) for k, v in sums.items()}


def _as_rgb(item) -> np.ndarray:
    """A path, PIL image or array -> RGB uint8 [H, W, 3]."""
    if isinstance(item, (str, Path)):
        return load_rgb(item)
    if hasattr(item, "mode") and hasattr(item, "size"):  # PIL image
        return to_rgb_array(item)
    array = np.asarray(item)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)  # [H, W] -> [H, W, 3]
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise UserError(f"predict: an image array must be [H, W, 3] RGB (or [H, W] grey), got shape {array.shape}")
    if array.dtype != np.uint8:
        raise UserError(f"predict: an image array must be uint8 (0-255), got {array.dtype}")
    return np.ascontiguousarray(array[:, :, :3])


def image_sample(transform, image: np.ndarray, index: int) -> dict:
    """An un-annotated image as a ``Collate`` sample."""
    h, w = image.shape[:2]
    image, boxes, labels, crowd = transform(image, np.zeros((0, 4), np.float32), np.zeros(0, np.int64),
                                            np.zeros(0, bool))
    return {"image": image, "boxes": boxes, "labels": labels, "crowd": crowd, "image_id": index,
            "orig_size": (h, w), "scale": (image.shape[0] / h, image.shape[1] / w)}
