"""COCO mAP with pycocotools: the one evaluation of the project.

``evaluate(detector, loader, dataset)`` is what the trainer's validation and ``retinanet-evaluate``
both call: detections from the ``Detector`` (sharded over ranks under DDP and gathered on rank 0),
COCO results with the dataset's own category ids, COCOeval over every image of the dataset (an image
that could not be read counts as one without detections: its objects are missed, not forgotten),
the 12 standard numbers and the per-class AP. A number COCO cannot compute (-1: no ground truth in
that area range or class) is ``None`` in the metrics and ``n/a`` when printed, never a fake 0.
Also here: detections -> COCO results (``to_coco_results``, for every JSON of detections), the confusion
matrix of the evaluation pictures (``confusion_matrix``), and the metrics an epoch is judged by
(``judged_metrics``).

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
from retinanet.boxes import pairwise_intersection, pairwise_iou, xywh_to_xyxy, xyxy_to_xywh
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


def to_coco_results(detections: list[dict], image_ids, label_to_cat_id: list[int],
                    class_names: list[str] | None = None) -> list[dict]:
    """Per-image ``{boxes xyxy, scores, labels}`` -> COCO result dicts: ``image_id``, ``category_id`` (the dataset's
    ids), ``bbox`` (xywh, 2 decimals), ``score`` (5 decimals). With ``class_names`` (inference's detections JSON)
    each also gets COCO's annotation fields ``category_name``, ``area`` (w * h, 2 decimals) and ``iscrowd`` 0."""
    cat_ids = np.asarray(label_to_cat_id)
    results = []
    for det, image_id in zip(detections, image_ids):
        boxes = det["boxes"].detach().cpu().double().numpy()
        if len(boxes) == 0:
            continue
        xywh = xyxy_to_xywh(boxes)
        # 5 decimals chosen in float32 (COCOeval ranks by them), written as those decimals, not float32's neighbours
        scores = det["scores"].detach().cpu().numpy().round(5)
        labels = det["labels"].detach().cpu().numpy()
        for box, wh, score, label in zip(xywh.round(2).tolist(), xywh[:, 2:].tolist(), scores.tolist(), labels.tolist()):
            result = {"image_id": int(image_id), "category_id": int(cat_ids[label]), "bbox": box, "score": round(score, 5)}
            if class_names is not None:
                result.update(category_name=class_names[label], area=round(wh[0] * wh[1], 2), iscrowd=0)
            results.append(result)
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
    if distributed.info().enabled:  # one gather: a rank whose images were all skipped has no losses (no reduce)
        shards = distributed.gather_to_main((detections, image_ids, losses))
        detections, image_ids = merge_shards([s[:2] for s in shards]) if shards is not None else ([], [])
        losses = mean_over_ranks([s[2] for s in shards]) if shards is not None else {}
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


def mean_over_ranks(losses: list[dict]) -> dict:
    """Each loss term's mean over the ranks that measured it (a rank that could read none of its images has none)."""
    keys = sorted({k for rank in losses for k in rank})
    return {k: sum(rank[k] for rank in losses if k in rank) / sum(k in rank for rank in losses) for k in keys}


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


# ---------------------------------------------------------------- confusion matrix (the pictures of an evaluation)

def confusion_matrix(detections: list[dict], ground_truths: list[dict], num_classes: int, score_thresh: float = 0.3,
                     iou_thresh: float = 0.5) -> tuple[np.ndarray, int]:
    """Count which class each confident detection took each ground-truth box for.

    ``detections[i]`` (``boxes`` [D, 4] xyxy, ``scores`` [D], ``labels`` [D]) and ``ground_truths[i]``
    (``boxes`` [G, 4] xyxy, ``labels`` [G], optional ``crowd`` [G] bool) are image i's, in the same pixels.
    Returns ``(matrix, ignored)``; ``matrix`` is [K + 1, K + 1] int64, K = ``num_classes``:

    - rows are the ground-truth class, columns the predicted class; row K and column K are *background*;
    - only detections scoring at least ``score_thresh`` take part. Per image they are taken greedily by
      score (highest first); each one matches at most one ground-truth box and each box at most one
      detection: among the still unmatched boxes with IoU >= ``iou_thresh``, one of the detection's own
      class if any, else any class; the highest IoU wins. Class-agnostic matching is what lets confusions
      show: a matched pair counts in ``matrix[gt class, predicted class]`` (the diagonal when right);
    - a detection that matches nothing is a false positive: ``matrix[K, predicted class]`` (the background
      row); unless it lies inside a crowd region (intersection / its own area >= ``iou_thresh``, COCO's
      rule), which COCO neither rewards nor penalises: it is counted in ``ignored`` only;
    - a ground-truth box no detection matched is missed: ``matrix[gt class, K]`` (the background column).
      Crowd boxes are regions to ignore, not objects: never counted;
    - ``matrix[K, K]`` is 0.

    So each ground-truth row sums to the number of (non-crowd) boxes of that class, and the predicted
    columns 0..K-1 together sum to the confident detections less ``ignored``.
    """
    k_bg = num_classes
    matrix = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    ignored = 0
    for det, gt in zip(detections, ground_truths):
        gt_boxes = torch.as_tensor(np.asarray(gt["boxes"], dtype=np.float64)).reshape(-1, 4)
        gt_labels = np.asarray(gt["labels"], dtype=np.int64).reshape(-1)
        crowd = np.asarray(gt.get("crowd", np.zeros(len(gt_labels), bool)), dtype=bool).reshape(-1)
        scores = torch.as_tensor(det["scores"]).double().reshape(-1)
        keep = torch.nonzero(scores >= score_thresh).flatten()
        keep = keep[torch.argsort(scores[keep], descending=True, stable=True)]  # greedy: best score first
        boxes = torch.as_tensor(det["boxes"]).double().reshape(-1, 4)[keep]
        labels = torch.as_tensor(det["labels"]).reshape(-1)[keep].numpy().astype(np.int64)
        objects, regions = gt_boxes[torch.from_numpy(~crowd)], gt_boxes[torch.from_numpy(crowd)]
        object_labels = gt_labels[~crowd]
        iou = pairwise_iou(boxes, objects).numpy() if len(objects) and len(boxes) else np.zeros((len(boxes), len(objects)))
        inside = _inside(boxes, regions)  # [D] max intersection / detection area over the crowd regions
        taken = np.zeros(len(objects), dtype=bool)
        for d, label in enumerate(labels.tolist()):
            candidates = ~taken & (iou[d] >= iou_thresh)
            if candidates.any():
                same = candidates & (object_labels == label)
                pool = same if same.any() else candidates
                g = int(np.argmax(np.where(pool, iou[d], -1.0)))
                taken[g] = True
                matrix[object_labels[g], label] += 1
            elif inside[d] >= iou_thresh:
                ignored += 1
            else:
                matrix[k_bg, label] += 1
        np.add.at(matrix, (object_labels[~taken], k_bg), 1)
    return matrix, ignored


def _inside(boxes: torch.Tensor, regions: torch.Tensor) -> np.ndarray:
    """For each box [D, 4], the largest fraction of its area inside one of ``regions`` [C, 4] (0 without regions)."""
    if not len(regions) or not len(boxes):
        return np.zeros(len(boxes))
    inter = pairwise_intersection(boxes, regions)  # [D, C]
    area = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(dim=1).clamp(min=1e-12)  # [D]
    return (inter / area[:, None]).max(dim=1).values.numpy()


def dataset_confusion(dataset, detections: list[dict], image_ids, score_thresh: float = 0.3,
                      iou_thresh: float = 0.5) -> tuple[np.ndarray, int]:
    """``confusion_matrix`` over every image of ``dataset`` (a ``CocoDetection``: the boxes COCOeval uses);
    ``detections`` / ``image_ids`` as ``evaluate`` returns them, labels in the dataset's label space. An image
    without detections (or not detected at all: unreadable) has all its boxes missed, as in COCOeval."""
    by_id = {int(i): d for d, i in zip(detections, image_ids)}
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    dets, gts = [], []
    for index, image_id in enumerate(dataset.image_ids):
        boxes, labels, crowd = dataset.annotations(index)
        gts.append({"boxes": boxes, "labels": labels, "crowd": crowd})
        dets.append(by_id.get(int(image_id), empty))
    return confusion_matrix(dets, gts, dataset.num_classes, score_thresh, iou_thresh)


def dataset_labels(detections: list[dict], category_ids, dataset) -> list[dict]:
    """Detections whose label k means category ``category_ids[k]`` (a checkpoint's classes) relabelled in
    ``dataset``'s label space (its own sorted category ids)."""
    to_dataset = torch.tensor([dataset.cat_id_to_label[int(c)] for c in category_ids], dtype=torch.int64)
    return [{**d, "labels": to_dataset[torch.as_tensor(d["labels"]).long()]} for d in detections]


@torch.no_grad()
def ground_truth_as_detections(coco_gt: COCO, cat_id_to_label: dict[int, int], image_ids) -> list[dict]:
    """Ground truth (non-crowd) as detections with score 1: the mAP = 1.0 sanity check."""
    dets = []
    for image_id in image_ids:
        anns = [a for a in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[image_id])) if not a.get("iscrowd", 0)]
        boxes = torch.from_numpy(xywh_to_xyxy(np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)))
        labels = torch.tensor([cat_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
        dets.append({"boxes": boxes, "scores": torch.ones(len(anns)), "labels": labels})
    return dets
