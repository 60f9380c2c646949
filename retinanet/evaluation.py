"""COCO mAP with pycocotools: detections -> COCO results -> the 12 standard numbers + per-class AP."""

from __future__ import annotations

import contextlib
import io
import logging

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

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


def coco_evaluate(coco_gt: COCO, results: list[dict], image_ids=None, with_precision: bool = False) -> dict:
    """Run COCOeval on ``results``. Returns ``{"stats": {name: value}, "per_class": {cat_id: AP}}``.

    With no detections at all every number is 0 (pycocotools cannot load an empty result list).
    ``with_precision`` adds ``"precision"``: COCOeval's array [IoU, recall, class (sorted ids), area,
    max dets] (for PR curves; a numpy array, so pop it before writing the metrics as JSON).
    """
    cat_ids = sorted(coco_gt.getCatIds())
    if not results:
        return {"stats": {k: 0.0 for k in STAT_NAMES}, "per_class": {c: 0.0 for c in cat_ids}}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        if image_ids is not None:
            ev.params.imgIds = sorted(int(i) for i in image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {k: max(float(v), 0.0) for k, v in zip(STAT_NAMES, ev.stats)}
    precision = ev.eval["precision"]  # [T iou, R recall, K class, A area, M maxdets]
    per_class = {}
    for k, cat in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        per_class[int(cat)] = float(p.mean()) if p.size else float("nan")
    out = {"stats": stats, "per_class": per_class}
    if with_precision:
        out["precision"] = precision
    return out


def format_metrics(metrics: dict, class_names: dict[int, str]) -> str:
    """The 12 COCO numbers and a per-class AP table as text."""
    lines = [f" {label} = {metrics['stats'][name]:.3f}   ({name})" for name, label in zip(STAT_NAMES, STAT_LABELS)]
    width = max([len(n) for n in class_names.values()] + [5])
    lines += ["", f" {'class':<{width}}  {'id':>4}  AP", f" {'-' * width}  {'-' * 4}  -----"]
    for cat, ap in metrics["per_class"].items():
        ap_txt = "  n/a" if np.isnan(ap) else f"{ap:.3f}"
        lines.append(f" {class_names.get(cat, str(cat)):<{width}}  {cat:>4}  {ap_txt}")
    return "\n".join(lines)


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
