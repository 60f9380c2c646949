"""TensorBoard views of what the detector does: drawn val images, per-class PR curves and AP,
the distribution of predicted scores, and the run's hyperparameters with its final metrics.

Every function takes a ``torch.utils.tensorboard.SummaryWriter`` and a global step. The trainer
calls ``log_eval_visuals`` after each evaluation and ``log_hparams`` once at the end of a run.
Tags (``val`` becomes ``val_ema`` for the EMA weights' evaluation):

- ``val_images/<n>_id<image id>``: the image twice, ground truth on the left in green (class
  names), predictions on the right in red (class and score); the same images at every
  evaluation, so the slider shows progress;
- ``val_pr_iou50/<class>``: COCO's interpolated precision-recall curve at IoU 0.5 (area all,
  100 detections), from ``COCOeval.eval["precision"]``;
- ``val_ap/<class>``: per-class AP@[.5:.95]; ``val/score_hist``: scores of all kept detections;
  ``val/detections_per_image``;
- HParams tab: the hyperparameters (``retinanet.report.hparams``: the built groups, ``HPARAM_KEYS`` and every
  command-line override), against ``hparam/<COCO number>`` (the final values).
"""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig

from retinanet.report.hparams import final_metrics, hparams_of
from retinanet.report.visualize import draw_boxes

GT_COLOR = (0, 230, 0)
PRED_COLOR = (255, 40, 40)


# ---------------------------------------------------------------- images

def _display_scale(h: int, w: int, min_side: int = 320, max_side: int = 640) -> float:
    """Small images are enlarged (legible captions), big ones shrunk (small event files)."""
    longest = max(h, w)
    if longest < min_side:
        return min_side / longest
    return min(1.0, max_side / longest)


def draw_eval_image(image: np.ndarray, gt_boxes, gt_labels, det: dict, class_names, min_score: float = 0.3,
                    max_dets: int = 20, gap: int = 4) -> np.ndarray:
    """RGB uint8 [H', 2 W' + gap, 3]: ``image`` (original pixels, resized for display) twice, side by side:
    left the ground truth in green (class names), right the ``max_dets`` best detections scoring at
    least ``min_score`` in red (``"<class> 0.87"``)."""
    from PIL import Image

    h, w = image.shape[:2]
    s = _display_scale(h, w)
    im = Image.fromarray(np.asarray(image, dtype=np.uint8))
    if s != 1.0:
        im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4) * s
    gt_labels = np.asarray(gt_labels).reshape(-1)
    left = draw_boxes(im, gt_boxes, [class_names[k] for k in gt_labels.tolist()], [GT_COLOR] * len(gt_boxes),
                      line_width=2)
    scores = torch.as_tensor(det["scores"]).float().reshape(-1)
    order = torch.argsort(scores, descending=True)[:max_dets]
    order = order[scores[order] >= min_score]
    boxes = torch.as_tensor(det["boxes"]).double().reshape(-1, 4)[order].numpy() * s
    labels = torch.as_tensor(det["labels"]).reshape(-1)[order].tolist()
    captions = [f"{class_names[k]} {v:.2f}" for k, v in zip(labels, scores[order].tolist())]
    right = draw_boxes(im, boxes, captions, [PRED_COLOR] * len(boxes), line_width=2)
    canvas = Image.new("RGB", (2 * im.width + gap, im.height), (255, 255, 255))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (im.width + gap, 0))
    return np.asarray(canvas)


def _ground_truth(dataset, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-crowd ground truth of image ``index``: the dataset's cleaned boxes (what training and COCOeval use),
    xyxy [N, 4] in original pixels, and labels [N]."""
    boxes, labels, crowd = dataset.annotations(index)
    return boxes[~crowd], labels[~crowd]


def log_val_images(writer, step: int, dataset, detections: list[dict], image_ids, num_images: int = 4,
                   min_score: float = 0.3, max_dets: int = 20, prefix: str = "val") -> int:
    """The first ``num_images`` evaluated images (dataset order: the same ones at every evaluation) with
    ground truth and predictions drawn. Returns the number of images logged."""
    index_of = {int(i): n for n, i in enumerate(dataset.image_ids)}
    logged = 0
    for det, image_id in zip(detections, image_ids):
        if logged >= num_images:
            break
        image_id = int(image_id)
        boxes, labels = _ground_truth(dataset, index_of[image_id])
        drawn = draw_eval_image(dataset.load_image(index_of[image_id]), boxes, labels, det, dataset.class_names,
                                min_score, max_dets)
        writer.add_image(f"{prefix}_images/{logged}_id{image_id}", drawn, step, dataformats="HWC")
        logged += 1
    return logged


# ---------------------------------------------------------------- curves and numbers

def pr_curve_arrays(precision_rk: np.ndarray, num_gt: int) -> dict | None:
    """One class's COCO precision over the 101 recall thresholds -> the six arrays of a TensorBoard PR curve.

    COCO's precision is interpolated (non-increasing in recall) and 0 beyond the highest recall
    reached; that tail is cut. Points run from high recall to low (like rising score thresholds).
    Counts: TP = recall * #gt, FP = TP / precision - TP, FN = #gt - TP, TN = 0 (undefined for
    detection). None if the class has no ground truth (COCO marks it -1)."""
    p = np.asarray(precision_rk, dtype=np.float64).reshape(-1)
    if p.size == 0 or (p < 0).all():
        return None
    recall = np.linspace(0.0, 1.0, p.size)
    reached = np.flatnonzero(p > 0)
    end = reached[-1] + 1 if reached.size else p.size
    p, recall = p[:end][::-1], recall[:end][::-1]
    tp = recall * num_gt
    fp = np.where(p > 0, tp / np.maximum(p, 1e-12) - tp, 0.0)
    return {"true_positive_counts": tp, "false_positive_counts": fp, "true_negative_counts": np.zeros_like(tp),
            "false_negative_counts": num_gt - tp, "precision": p, "recall": recall}


def log_pr_curves(writer, step: int, precision: np.ndarray, class_names, num_gt=None, iou_index: int = 0,
                  prefix: str = "val") -> list[str]:
    """Per-class PR curves from ``COCOeval.eval["precision"]`` [T, R, K, A, M] at IoU threshold
    ``iou_index`` (0 = IoU 0.5, 5 = 0.75), area all, the largest maxDets. Column k is the k-th
    category in sorted id order (COCOeval's default), ``class_names[k]`` its name, ``num_gt[k]`` its
    number of ground-truth boxes. Returns the tags."""
    tags = []
    for k, name in enumerate(class_names):
        arrays = pr_curve_arrays(precision[iou_index, :, k, 0, -1], int(num_gt[k]) if num_gt is not None else 1)
        if arrays is None:
            continue
        tag = f"{prefix}_pr_iou{50 + 5 * iou_index}/{name}"
        writer.add_pr_curve_raw(tag, global_step=step, num_thresholds=len(arrays["precision"]), **arrays)
        tags.append(tag)
    return tags


def log_class_ap(writer, step: int, per_class: dict, cat_ids, class_names, prefix: str = "val") -> None:
    """``val_ap/<class>`` scalars from ``metrics["per_class"]`` ({category id: AP}); classes without
    ground truth are skipped."""
    for cat, name in zip(cat_ids, class_names):
        ap = per_class.get(int(cat), per_class.get(str(cat)))
        if ap is not None and np.isfinite(ap):  # None: no ground truth of that class
            writer.add_scalar(f"{prefix}_ap/{name}", float(ap), step)


def log_score_distribution(writer, step: int, detections: list[dict], prefix: str = "val") -> None:
    """Histogram of the scores of every kept detection and the mean number of detections per image."""
    scores = [d["scores"].detach().float().reshape(-1).cpu() for d in detections]
    flat = torch.cat(scores) if scores else torch.zeros(0)
    writer.add_scalar(f"{prefix}/detections_per_image", flat.numel() / max(1, len(detections)), step)
    if flat.numel():
        writer.add_histogram(f"{prefix}/score_hist", flat, step, bins="auto" if flat.numel() > 1 else "tensorflow")


def num_gt_per_class(dataset, cat_ids) -> list[int]:
    """Non-crowd ground-truth boxes per category of the dataset (what COCOeval counts for area 'all')."""
    counts = dict(zip(dataset.label_to_cat_id, dataset.class_counts().tolist()))
    return [int(counts[int(c)]) for c in cat_ids]


def log_eval_visuals(writer, step: int, dataset, detections: list[dict], image_ids, metrics: dict,
                     precision: np.ndarray | None = None, num_images: int = 4, min_score: float = 0.3,
                     prefix: str = "val") -> None:
    """Everything an evaluation shows in TensorBoard (see the module docstring).

    ``dataset`` is the evaluated ``CocoDetection``; ``detections`` / ``image_ids`` come from
    ``engine.predict``; ``metrics`` from ``coco_evaluate``; ``precision`` is ``COCOeval.eval["precision"]``
    (None: no PR curves, e.g. when there was no detection at all); ``prefix`` starts every tag
    (``val``; ``val_ema`` for the EMA weights)."""
    cat_ids, names = list(dataset.label_to_cat_id), list(dataset.class_names)
    log_val_images(writer, step, dataset, detections, image_ids, num_images, min_score, prefix=prefix)
    log_class_ap(writer, step, metrics.get("per_class", {}), cat_ids, names, prefix)
    log_score_distribution(writer, step, detections, prefix)
    if precision is not None:
        order = np.argsort(cat_ids)  # COCOeval's class columns follow sorted category ids
        log_pr_curves(writer, step, precision, [names[k] for k in order],
                      num_gt_per_class(dataset, [cat_ids[k] for k in order]), prefix=prefix)


# ---------------------------------------------------------------- hyperparameters

def log_hparams(writer, cfg: DictConfig, metrics: dict | None, step: int | None = None) -> dict:
    """Record the run's hyperparameters (``retinanet.report.hparams.hparams_of``) with its final metrics
    (``metrics``: the final ``evaluate`` result; None: only the hyperparameters) for the HParams tab
    (``write_hparams``). Returns the hparams dict."""
    hp = hparams_of(cfg)
    write_hparams(writer, hp, final_metrics(metrics), step)
    return hp


def write_hparams(writer, hp: dict, final: dict[str, float], step: int | None = None) -> None:
    """``hp`` against ``final`` (``{AP: .., val_loss: ..}``, as ``hparam/<name>``) in the run's own event file
    (not a sub-run as ``SummaryWriter.add_hparams`` does), so each run dir is one session.

    Only the session start / end records are written, no experiment record: TensorBoard then builds
    the table from all sessions (the union of their hyperparameters, every scalar as a metric),
    whereas with one experiment record per run it would pick one run's columns arbitrarily."""
    from torch.utils.tensorboard.summary import hparams

    metric_values = {f"hparam/{name}": value for name, value in final.items()}
    _, start, end = hparams(hp, metric_values)
    file_writer = writer._get_file_writer()
    for summary in (start, end):
        file_writer.add_summary(summary, step)
    for tag, value in metric_values.items():
        writer.add_scalar(tag, value, step)
    writer.flush()
