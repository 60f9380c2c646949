"""The pictures of a run, as PNG files (matplotlib, Agg): what TensorBoard shows, readable without it.

``write_run_plots`` is called at the end of a training run (rank 0) and ``write_evaluation_plots`` by
``retinanet-evaluate``; both write into ``<run>/plots/`` (docs/run_outputs.md lists the files):

- ``loss_lr.png``: loss, loss_cls, loss_box and the learning rate over steps (the values logged to
  loggers every ``trainer.log_every`` steps, kept by ``loggers.curves.CurveRecorder``), with the epoch means and
  the validation loss as markers;
- ``ap_history.png``: AP and AP50 of every evaluated epoch (``metrics.json``'s history);
- ``pr_curves_iou50.png``: per-class precision-recall at IoU 0.5 (area all, 100 detections), from
  COCOeval's precision array;
- ``confusion_matrix.png`` + ``.json``: classes confused with each other (``evaluation.confusion_matrix``);
- ``val_images.png``: validation images, ground truth | predictions (``tensorboard.draw_eval_image``).

Every function takes plain data (history, ``Evaluation``, dataset) and returns the file it wrote.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from retinanet.evaluation import dataset_confusion, dataset_labels
from retinanet.files import atomic_write_json
from retinanet.report.tensorboard import draw_eval_image, num_gt_per_class, pr_curve_arrays

log = logging.getLogger(__name__)

CURVE_TAGS = {"train/loss": "loss", "train/loss_cls": "loss_cls", "train/loss_box": "loss_box", "train/lr": "lr"}
TERM_COLORS = {"loss": "black", "loss_cls": "tab:blue", "loss_box": "tab:orange"}


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path, dpi: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


# ---------------------------------------------------------------- training curves

def plot_loss_lr(curves: dict, history: list[dict], path: str | Path) -> Path:
    """Loss terms (top) and learning rate (bottom) over optimiser steps: ``curves`` per logged step (lines),
    ``history``'s epoch means and validation losses at each epoch's last step (markers)."""
    fig = _figure(9, 6)
    ax_loss, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    for term, color in TERM_COLORS.items():
        points = np.asarray(curves.get(term, []), dtype=np.float64).reshape(-1, 2)
        if len(points):
            ax_loss.plot(points[:, 0], points[:, 1], color=color, lw=1, alpha=0.8, label=f"{term} (per step)")
        epochs = [(e["step"], e["train"][term]) for e in history if e.get("train", {}).get(term) is not None]
        if epochs:
            ax_loss.plot(*zip(*epochs), "o", color=color, ms=5, label=f"{term} (epoch mean)")
        val = [(e["step"], e["val"]["loss"][term]) for e in history
               if e.get("val", {}).get("loss", {}).get(term) is not None]
        if val:
            ax_loss.plot(*zip(*val), "x", color=color, ms=7, mew=2, label=f"{term} (validation)")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("Training loss")
    ax_loss.grid(alpha=0.3)
    if ax_loss.has_data():
        ax_loss.legend(fontsize=7, ncol=3)
    lr = np.asarray(curves.get("lr", []), dtype=np.float64).reshape(-1, 2)
    if len(lr):
        ax_lr.plot(lr[:, 0], lr[:, 1], color="tab:green", lw=1.2)
    else:
        ax_lr.text(0.5, 0.5, "no step logged (trainer.log_every > steps trained)", ha="center", va="center",
                   transform=ax_lr.transAxes)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimiser step")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax_lr.grid(alpha=0.3)
    return _save(fig, Path(path))


def plot_ap_history(history: list[dict], path: str | Path) -> Path | None:
    """AP and AP50 over the evaluated epochs (solid: the weights; dashed: the EMA weights). None when no epoch
    was evaluated."""
    fig = _figure(7, 4.5)
    ax = fig.subplots()
    for key, style, label in (("val", "-", ""), ("val_ema", "--", " (EMA)")):
        for stat, color in (("AP", "tab:blue"), ("AP50", "tab:orange")):
            points = [(e["epoch"], e[key]["stats"][stat]) for e in history
                      if key in e and e[key]["stats"].get(stat) is not None]
            if points:
                ax.plot(*zip(*points), style, marker="o", color=color, label=f"{stat}{label}")
    if not ax.has_data():
        return None
    ax.set_xlabel("epoch")
    ax.set_ylabel("COCO metric")
    ax.set_ylim(0, 1)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Validation AP@[.5:.95] and AP50 per evaluated epoch")
    return _save(fig, Path(path))


# ---------------------------------------------------------------- evaluation

def plot_pr_curves(precision: np.ndarray, class_names, num_gt, path: str | Path, max_legend: int = 12) -> Path:
    """Per-class precision-recall at IoU 0.5, area all, 100 detections: ``precision`` is COCOeval's array
    [T, R, K, A, M]; ``class_names[k]`` / ``num_gt[k]`` belong to its column k (sorted category ids). A class
    without ground truth has no curve; AP50 in the legend is COCO's (the mean over the 101 recall points)."""
    fig = _figure(7, 6)
    ax = fig.subplots()
    from matplotlib import colormaps

    colors = colormaps["tab10" if len(class_names) <= 10 else "tab20"]
    curves = 0
    for k, name in enumerate(class_names):
        p = precision[0, :, k, 0, -1]
        arrays = pr_curve_arrays(p, int(num_gt[k]))
        if arrays is None:
            continue
        label = f"{name}  AP50 {p.mean():.3f}" if len(class_names) <= max_legend else None
        ax.plot(arrays["recall"], arrays["precision"], color=colors(k % colors.N), lw=1.5, label=label)
        curves += 1
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision (interpolated)")
    ax.grid(alpha=0.3)
    ax.set_title("Precision-recall per class, IoU 0.5 (area all, 100 detections)")
    if curves and len(class_names) <= max_legend:
        ax.legend(fontsize=8, loc="lower left")
    elif not curves:
        ax.text(0.5, 0.5, "no class has ground truth", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, Path(path))


def plot_confusion(matrix: np.ndarray, class_names, path: str | Path, score_thresh: float, iou_thresh: float,
                   ignored: int = 0) -> Path:
    """``matrix`` of ``evaluation.confusion_matrix`` as a heat map: counts in the cells, colour = the fraction of its row
    (the ground-truth boxes of a class; for the background row, the false positives)."""
    names = [*class_names, "background"]
    n = len(names)
    rows = matrix.sum(axis=1, keepdims=True)
    fraction = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=np.float64), where=rows > 0)
    side = max(5.0, 0.55 * n + 2.5)
    fig = _figure(side + 1, side)
    ax = fig.subplots()
    image = ax.imshow(fraction, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the row")
    if n <= 30:
        for r in range(n):
            for c in range(n):
                if matrix[r, c]:
                    ax.text(c, r, str(matrix[r, c]), ha="center", va="center", fontsize=8,
                            color="white" if fraction[r, c] > 0.6 else "black")
    ticks = list(range(n))
    ax.set_xticks(ticks, [*class_names, "missed"], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(ticks, [*class_names, "false positive"], fontsize=8)
    ax.axhline(n - 1.5, color="grey", lw=0.8)
    ax.axvline(n - 1.5, color="grey", lw=0.8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("ground-truth class")
    crowd = f", {ignored} on crowd regions left out" if ignored else ""
    ax.set_title(f"Confusion matrix: detections scoring >= {score_thresh:g} matched at IoU >= {iou_thresh:g}\n"
                 f"{int(matrix[:-1].sum())} ground-truth boxes, {int(matrix[:, :-1].sum())} detections{crowd}",
                 fontsize=9)
    return _save(fig, Path(path))


def plot_val_images(dataset, detections: list[dict], image_ids, path: str | Path, num_images: int = 8,
                    min_score: float = 0.3, columns: int = 2) -> Path | None:
    """The first ``num_images`` evaluated images (dataset order: those TensorBoard shows), each ground truth
    (green) | predictions scoring at least ``min_score`` (red), in a grid. None when there is no image."""
    index_of = {int(i): n for n, i in enumerate(dataset.image_ids)}
    drawn = []
    for det, image_id in list(zip(detections, image_ids))[:num_images]:
        index = index_of[int(image_id)]
        boxes, labels, crowd = dataset.annotations(index)  # the boxes COCOeval uses; crowd regions not drawn
        drawn.append((int(image_id), draw_eval_image(dataset.load_image(index), boxes[~crowd], labels[~crowd], det,
                                                     dataset.class_names, min_score)))
    if not drawn:
        return None
    columns = min(columns, len(drawn))
    rows = math.ceil(len(drawn) / columns)
    h = max(im.shape[0] for _, im in drawn)
    w = max(im.shape[1] for _, im in drawn)
    fig = _figure(columns * w / 100, rows * (h / 100 + 0.35))
    axes = np.asarray(fig.subplots(rows, columns, squeeze=False)).reshape(-1)
    for ax, (image_id, im) in zip(axes, drawn):
        ax.imshow(im)
        ax.set_title(f"image id {image_id}: ground truth | predictions >= {min_score:g}", fontsize=9)
    for ax in axes:
        ax.axis("off")
    return _save(fig, Path(path))


# ---------------------------------------------------------------- all of them

def write_evaluation_plots(out_dir: str | Path, evaluation, dataset, score_thresh: float = 0.3,
                           iou_thresh: float = 0.5, num_images: int = 8, category_ids=None) -> list[Path]:
    """PR curves, confusion matrix (PNG + JSON) and drawn validation images of one ``Evaluation`` of
    ``dataset`` into ``out_dir``. ``category_ids``: the dataset category of each detection label when the
    detector's classes are not the dataset's own order (``Detector.dataset_category_ids``)."""
    out_dir = Path(out_dir)
    detections = evaluation.detections
    if category_ids is not None and list(category_ids) != list(dataset.label_to_cat_id):
        detections = dataset_labels(detections, category_ids, dataset)
    cat_ids, names = list(dataset.label_to_cat_id), list(dataset.class_names)
    order = np.argsort(cat_ids)  # COCOeval's class columns follow sorted category ids
    written = []

    def pr_curves():
        if evaluation.precision is not None:
            return plot_pr_curves(evaluation.precision, [names[k] for k in order],
                                  num_gt_per_class(dataset, [cat_ids[k] for k in order]), out_dir / "pr_curves_iou50.png")

    def confusion():
        matrix, ignored = dataset_confusion(dataset, detections, evaluation.image_ids, score_thresh, iou_thresh)
        atomic_write_json({"rows": "ground-truth class, then background (false positives)",
                           "columns": "predicted class, then background (missed ground truth)",
                           "classes": names, "score_thresh": score_thresh, "iou_thresh": iou_thresh,
                           "ignored_on_crowd": ignored, "matrix": matrix.tolist()}, out_dir / "confusion_matrix.json")
        return plot_confusion(matrix, names, out_dir / "confusion_matrix.png", score_thresh, iou_thresh, ignored)

    def images():
        if num_images:
            return plot_val_images(dataset, detections, evaluation.image_ids, out_dir / "val_images.png", num_images,
                                   score_thresh)

    for name, draw in (("PR curves", pr_curves), ("confusion matrix", confusion), ("validation images", images)):
        written.append(_draw(name, draw))
    return [p for p in written if p is not None]


def write_run_plots(out_dir: str | Path, history: list[dict], curves: dict, evaluation=None, dataset=None,
                    score_thresh: float = 0.3, iou_thresh: float = 0.5, num_images: int = 8) -> list[Path]:
    """Every picture of a training run into ``out_dir``: loss / learning rate and AP history from ``curves``
    and ``history``; the evaluation pictures (``write_evaluation_plots``) of the final ``evaluation`` of
    ``dataset`` (None, e.g. a resumed run that had nothing left to train: those are left out). Returns the
    files written; a picture that fails is logged and skipped, the others are still drawn."""
    out_dir = Path(out_dir)
    written = [_draw("loss and learning rate", lambda: plot_loss_lr(curves, history, out_dir / "loss_lr.png")),
               _draw("AP history", lambda: plot_ap_history(history, out_dir / "ap_history.png"))]
    if evaluation is not None and dataset is not None and evaluation.image_ids:
        written += write_evaluation_plots(out_dir, evaluation, dataset, score_thresh, iou_thresh, num_images)
    written = [p for p in written if p is not None]
    log.info("pictures of the run: %s (%s)", out_dir, ", ".join(p.name for p in written))
    return written


def _draw(name: str, fn) -> Path | None:
    """``fn()``, or None with a warning naming the picture if it fails: a picture is never worth losing the end of
    a run for (checkpoints and metrics.json are written before)."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - any failure of a picture: logged, the run goes on
        log.warning("the %s picture could not be drawn: %s: %s", name, type(err).__name__, err,
                    exc_info=log.isEnabledFor(logging.DEBUG))
        return None
