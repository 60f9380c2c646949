"""COCO mAP with pycocotools: the one evaluation of the project.

``evaluate(detector, loader, dataset)`` is what the trainer's validation and ``retinanet-evaluate``
both call: detections from the ``Detector`` (sharded over ranks under DDP and gathered on rank 0),
COCO results with the dataset's own category ids, COCOeval over every image of the dataset (an image
that could not be read counts as one without detections: its objects are missed, not forgotten),
the 12 standard numbers and the per-class AP. A number COCO cannot compute (-1: no ground truth in
that area range or class) is ``None`` in the metrics and ``n/a`` when printed, never a fake 0.

COCOeval comes from pycocotools (the metric of record) or, with ``backend="faster_coco_eval"``
(config ``evaluation.backend``; ``pip install 'retinanet[fast-eval]'``), from faster-coco-eval: its
matching and accumulation in C++, the same numbers (tests/test_coco_backends.py checks all 12 and
the per-class AP to 1e-6), several times faster on large validation sets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import time

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from retinanet import distributed
from retinanet.errors import ConfigError

log = logging.getLogger(__name__)

STAT_NAMES = (
    "AP", "AP50", "AP75", "APs", "APm", "APl",
    "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)
STAT_LABELS = (
    "AP @[IoU=0.50:0.95 | area=all | maxDets=100]",
    "AP @[IoU=0.50      | area=all | maxDets=100]",
    "AP @[IoU=0.75      | area=all | maxDets=100]",
    "AP @[IoU=0.50:0.95 | area=small | maxDets=100]",
    "AP @[IoU=0.50:0.95 | area=medium | maxDets=100]",
    "AP @[IoU=0.50:0.95 | area=large | maxDets=100]",
    "AR @[IoU=0.50:0.95 | area=all | maxDets=1]",
    "AR @[IoU=0.50:0.95 | area=all | maxDets=10]",
    "AR @[IoU=0.50:0.95 | area=all | maxDets=100]",
    "AR @[IoU=0.50:0.95 | area=small | maxDets=100]",
    "AR @[IoU=0.50:0.95 | area=medium | maxDets=100]",
    "AR @[IoU=0.50:0.95 | area=large | maxDets=100]",
)


def to_coco_results(detections: list[dict], image_ids, label_to_cat_id: list[int]) -> list[dict]:
    """Per-image ``{boxes xyxy, scores, labels}`` -> COCO result dicts (xywh, dataset category ids)."""
    cat_ids = np.asarray(label_to_cat_id)
    results = []
    for det, image_id in zip(detections, image_ids):
        boxes = det["boxes"].detach().cpu().double().numpy()
        if len(boxes) == 0:
            continue
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).round(2)
        scores = det["scores"].detach().cpu().numpy().round(5)
        cats = cat_ids[det["labels"].detach().cpu().numpy()]
        for box, score, cat in zip(xywh.tolist(), scores.tolist(), cats.tolist()):
            results.append({"image_id": int(image_id), "category_id": int(cat), "bbox": box, "score": float(score)})
    return results


def _results(coco_gt: COCO, results: list[dict]) -> COCO:
    """``results`` as a pycocotools result set (``loadRes`` cannot load an empty list: built directly then)."""
    if results:
        return coco_gt.loadRes([dict(r) for r in results])  # loadRes adds keys in place: give it copies
    empty = COCO()
    empty.dataset = {"images": list(coco_gt.dataset["images"]), "categories": list(coco_gt.dataset["categories"]),
                     "annotations": []}
    empty.createIndex()
    return empty


BACKENDS = ("pycocotools", "faster_coco_eval")


def check_backend(backend: str) -> str:
    """``backend`` if it is one of ``BACKENDS`` and importable, else a ``ConfigError`` saying what to do."""
    if backend not in BACKENDS:
        raise ConfigError(f"evaluation.backend={backend!r} is not one of {list(BACKENDS)}")
    if backend == "faster_coco_eval":
        try:
            import faster_coco_eval  # noqa: F401
        except ImportError:
            raise ConfigError("evaluation.backend=faster_coco_eval needs the faster-coco-eval package, which is not "
                              "installed: pip install 'retinanet[fast-eval]' (or pip install faster-coco-eval), or use "
                              "evaluation.backend=pycocotools") from None
    return backend


def _faster_cocoeval(coco_gt: COCO, results: list[dict]):
    """faster-coco-eval's COCOeval on the same ground truth (``coco_gt``'s records, copied: COCOeval marks them)."""
    from faster_coco_eval import COCO as FastCOCO
    from faster_coco_eval import COCOeval_faster

    quiet = lambda *args, **kwargs: None
    gt = FastCOCO(print_function=quiet)
    gt.dataset = {"images": list(coco_gt.dataset["images"]), "categories": list(coco_gt.dataset["categories"]),
                  "annotations": [dict(a) for a in coco_gt.dataset["annotations"]]}
    gt.createIndex()
    detections = gt.loadRes([dict(r) for r in results])  # loadRes adds keys in place: give it copies
    return COCOeval_faster(gt, detections, "bbox", print_function=quiet)


def coco_evaluate(coco_gt: COCO, results: list[dict], image_ids=None, with_precision: bool = False,
                  backend: str = "pycocotools") -> dict:
    """Run COCOeval on ``results`` over ``image_ids`` (default: every image of ``coco_gt``).

    Returns ``{"stats": {name: value or None}, "per_class": {cat_id: AP or None}}``; None where COCO
    has nothing to measure (no ground truth in that area range, or of that class). ``with_precision``
    adds ``"precision"``: COCOeval's array [IoU, recall, class (sorted ids), area, max dets] (for PR
    curves; a numpy array, so pop it before writing the metrics as JSON). ``backend``: ``pycocotools`` or
    ``faster_coco_eval`` (same numbers, faster; see the module docstring).
    """
    check_backend(backend)
    with contextlib.redirect_stdout(io.StringIO()):
        if backend == "faster_coco_eval":
            ev = _faster_cocoeval(coco_gt, results)
        else:
            ev = COCOeval(coco_gt, _results(coco_gt, results), "bbox")
        if image_ids is not None:
            ev.params.imgIds = sorted(int(i) for i in image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {k: (float(v) if v >= 0 else None) for k, v in zip(STAT_NAMES, ev.stats)}  # faster_coco_eval: 12 + AR50, AR75
    precision = ev.eval["precision"]  # [T iou, R recall, K class, A area, M maxdets]
    per_class = {}
    for k, cat in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        per_class[int(cat)] = float(p.mean()) if p.size else None
    out = {"stats": stats, "per_class": per_class}
    if with_precision:
        out["precision"] = precision
    return out


def _number(value) -> str:
    return "  n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.3f}"


def format_metrics(metrics: dict, class_names: dict[int, str]) -> str:
    """The 12 COCO numbers and a per-class AP table as text (``n/a`` where COCO has nothing to measure)."""
    lines = [f" {label} = {_number(metrics['stats'][name])}   ({name})" for name, label in zip(STAT_NAMES, STAT_LABELS)]
    width = max([len(n) for n in class_names.values()] + [5])
    lines += ["", f" {'class':<{width}}  {'id':>4}  AP", f" {'-' * width}  {'-' * 4}  -----"]
    for cat, ap in metrics["per_class"].items():
        lines.append(f" {class_names.get(int(cat), str(cat)):<{width}}  {int(cat):>4}  {_number(ap)}")
    return "\n".join(lines)


def judged_metrics(entry: dict) -> dict | None:
    """The validation metrics an epoch is judged by: of the EMA weights when the run keeps an EMA."""
    return entry.get("val_ema") or entry.get("val")


@dataclasses.dataclass
class Evaluation:
    """One evaluation: ``metrics`` (JSON-ready: stats, per_class, loss, images, seconds) and, on rank 0,
    what the pictures and TensorBoard views are drawn from."""

    metrics: dict
    detections: list = dataclasses.field(default_factory=list)   # per image, original pixels
    image_ids: list = dataclasses.field(default_factory=list)
    precision: np.ndarray | None = None                          # COCOeval.eval["precision"]


def evaluate(detector, loader, dataset, criterion=None, progress: bool = True, desc: str = "eval",
             category_ids: list[int] | None = None, backend: str = "pycocotools") -> Evaluation:
    """COCO evaluation of ``detector`` on ``dataset`` (its ``loader``), identical on every rank.

    ``criterion``: also the mean losses of the same forward passes (``metrics["loss"]``).
    ``category_ids``: the dataset category id of each label (default: the dataset's own map).
    ``backend``: which COCOeval computes the numbers (``coco_evaluate``); checked before detecting.
    Under DDP each rank detects its share; rank 0 gathers the detections, drops the repeats that pad
    the shares, and runs COCOeval once; every rank gets the metrics.
    """
    check_backend(backend)
    t0 = time.perf_counter()
    detections, image_ids, losses = detector.detect(loader, progress, desc, criterion)
    if distributed.info().enabled:
        shards = distributed.gather_to_main((detections, image_ids))
        detections, image_ids = merge_shards(shards) if shards is not None else ([], [])
        world = distributed.info().world_size
        losses = {k: float(distributed.all_reduce_sum(torch.tensor(v))) / world for k, v in losses.items()}
    result = Evaluation(metrics={})
    if distributed.info().is_main:
        results = to_coco_results(detections, image_ids, category_ids or dataset.label_to_cat_id)
        metrics = coco_evaluate(dataset.coco, results, dataset.image_ids, with_precision=True, backend=backend)
        precision = metrics.pop("precision")
        metrics.update(loss=losses, images=len(dataset.image_ids), detected_images=len(image_ids),
                       detections=len(results), seconds=time.perf_counter() - t0)
        result = Evaluation(metrics, detections, image_ids, precision)
    result.metrics = distributed.broadcast_object(result.metrics)
    return result


def merge_shards(shards: list[tuple[list, list]]) -> tuple[list, list]:
    """Detections of every rank in one list, each image once (the sampler repeats some to even out shares)."""
    detections, image_ids, seen = [], [], set()
    for dets, ids in shards:
        for d, i in zip(dets, ids):
            if i not in seen:
                seen.add(i)
                detections.append(d)
                image_ids.append(i)
    return detections, image_ids


@torch.no_grad()
def ground_truth_as_detections(coco_gt: COCO, cat_id_to_label: dict[int, int], image_ids) -> list[dict]:
    """Ground truth (non-crowd) as detections with score 1: the mAP = 1.0 sanity check."""
    dets = []
    for image_id in image_ids:
        anns = [a for a in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[image_id])) if not a.get("iscrowd", 0)]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float64).reshape(-1, 4)
        labels = torch.tensor([cat_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
        dets.append({"boxes": boxes, "scores": torch.ones(len(anns)), "labels": labels})
    return dets
