"""Dataset statistics: what to look at when mAP stays at 0 on your data (``retinanet-inspect``), and what
``recipe=auto`` fits its values to.

- counts: images, images without boxes, boxes per class, crowd (ignore) boxes, dropped boxes;
- image and box sizes in original pixels (``box_statistics``: the resize ``recipe=auto`` chooses);
- box sizes (``sqrt(w * h)`` after the training resize, the scale the anchors see) and aspect ratios;
- anchor coverage: for every non-crowd box, does the configured matcher give it at least one
  positive anchor, does some anchor reach IoU >= ``fg_iou`` on its own (without the low-quality
  rule, which matches almost anything at a poor IoU), and what is its best anchor IoU, by size bucket.
  Anchors and feature shapes are computed for the padded, resized image as in training
  (``best_anchor_iou``: the anchor sizes ``recipe=auto`` chooses);
- a per-class focal-loss alpha suggested from the class frequencies (``loss.alpha=auto`` uses the same rule).

Nothing is decoded for the statistics: sizes come from the annotation file.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from tqdm import tqdm

from retinanet.boxes import pairwise_iou, xyxy_to_xywh
from retinanet.data.transforms import resized_shape
from retinanet.losses import alpha_from_counts
from retinanet.matcher import Matcher

log = logging.getLogger(__name__)
SIZE_EDGES = (0, 16, 32, 64, 128, 256, 512, math.inf)  # buckets of sqrt(box area) in resized pixels


def bucket_names(edges=SIZE_EDGES) -> list[str]:
    return [f"{lo}-{hi}" if hi != math.inf else f">={lo}" for lo, hi in zip(edges[:-1], edges[1:])]


def dataset_statistics(dataset) -> dict:
    """Counts per class, images without boxes and crowd boxes of a ``CocoDetection`` (no image decoded)."""
    counts = dataset.class_counts()
    return {
        "images": len(dataset), "images_without_boxes": int((dataset.boxes_per_image() == 0).sum()),
        "boxes": int(counts.sum()), "crowd_boxes": dataset.crowd_count(),
        "boxes_per_class": {name: int(n) for name, n in zip(dataset.class_names, counts)},
        "dropped_boxes": dict(dataset.box_counts), "skipped_records": dict(dataset.skipped),
    }


def box_statistics(dataset, max_images: int | None = None) -> dict:
    """Image and box statistics of a ``CocoDetection`` from its annotations (original pixels): what ``recipe=auto``
    fits the resize to."""
    n = len(dataset)
    index = np.arange(n) if not max_images or max_images >= n else np.linspace(0, n - 1, max_images).round()
    sizes = np.array([dataset.image_size(int(i)) for i in index], dtype=np.float64).reshape(-1, 2)  # (h, w)
    boxes = [dataset.annotations(int(i)) for i in index]
    xyxy = np.concatenate([b[~c] for b, _, c in boxes]) if boxes else np.zeros((0, 4))
    longer = np.concatenate([np.full(int((~c).sum()), sizes[k].max()) for k, (_, _, c) in enumerate(boxes)]) \
        if boxes else np.zeros(0)
    wh = xyxy_to_xywh(xyxy)[:, 2:]
    side = np.sqrt(np.clip(wh[:, 0] * wh[:, 1], 0, None))
    return {
        "images": n, "examined": len(index), "boxes": int(len(side)),
        "image_longer_side": float(np.median(sizes.max(axis=1))) if len(sizes) else math.nan,
        "box_side_p5": float(np.percentile(side, 5)) if len(side) else math.nan,
        "box_side_median": float(np.median(side)) if len(side) else math.nan,
        # box size relative to its image's longer side: what a resize keeps
        "relative_side_p5": float(np.percentile(side / longer, 5)) if len(side) else math.nan,
        # longer / shorter side of the images: how long a max_size lets the shorter side reach a min_size
        "image_aspect_p95": float(np.percentile(sizes.max(axis=1) / np.maximum(sizes.min(axis=1), 1), 95))
        if len(sizes) else math.nan,
        "boxes_per_image": float(len(side) / max(1, len(index))),
    }


def examined_min_size(min_size):
    """The shorter side the statistics resize to: a list ``min_size`` (multi-scale training) at its largest."""
    if min_size is not None and not isinstance(min_size, (int, float)):
        return max(int(v) for v in min_size)
    return min_size


def stratified(labels: np.ndarray, max_boxes: int) -> np.ndarray:
    """Indices of at most ``max_boxes`` of ``labels`` (sorted), evenly spaced within each class, each class
    getting an equal share of the budget (a class with fewer boxes keeps them all, its unused share goes to the
    others): a rare class keeps its boxes."""
    if len(labels) <= max_boxes:
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.zeros(len(classes), dtype=np.int64)
    left = max_boxes
    for j, k in enumerate(np.argsort(counts, kind="stable")):  # smallest first: what they leave goes to the rest
        quota[k] = min(counts[k], left // (len(classes) - j))
        left -= quota[k]
    picked = [np.flatnonzero(labels == c)[np.linspace(0, n - 1, q).round().astype(int)]
              for c, n, q in zip(classes, counts, quota) if q]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def _resized_boxes(dataset, i: int, min_size, max_size, size_divisible: int, min_box_size: float = 1.0):
    """Non-crowd + crowd boxes of image ``i`` in the resized image, the padded size, and which boxes survive
    the transform's ``min_box_size`` filter."""
    boxes, labels, crowd = dataset.annotations(i)
    h, w = dataset.image_size(i)
    out_h, out_w = resized_shape(h, w, min_size, max_size)
    boxes = boxes * np.array([out_w / w, out_h / h, out_w / w, out_h / h], dtype=np.float32)
    pad = (-(-out_h // size_divisible) * size_divisible, -(-out_w // size_divisible) * size_divisible)
    alive = ((boxes[:, 2] - boxes[:, 0]) >= min_box_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_box_size)
    return boxes, labels, crowd, pad, alive


def best_anchor_iou(dataset, anchors, min_size: int | None, max_size: int | None, size_divisible: int,
                    max_images: int | None = None, max_boxes: int = 2000, with_labels: bool = False):
    """The best IoU of each non-crowd box with the anchors of its padded, resized image (boxes the transform
    would drop count as 0), for at most ``max_boxes`` boxes (``stratified`` by class) of ``max_images`` images;
    ``with_labels``: (ious, the boxes' labels). A list ``min_size`` is examined at its largest value.

    Images of one padded size share one anchor grid: the IoUs are computed per size, in chunks of boxes, so a
    search over many anchor settings stays fast (``retinanet.recipe``)."""
    min_size = examined_min_size(min_size)
    n = len(dataset)
    index = np.arange(n) if not max_images or max_images >= n else np.linspace(0, n - 1, max_images).round().astype(int)
    by_pad: dict[tuple, list] = {}
    for i in index.tolist():
        boxes, labels, crowd, pad, alive = _resized_boxes(dataset, i, min_size, max_size, size_divisible)
        keep = ~crowd
        by_pad.setdefault(pad, []).append((boxes[keep], alive[keep], np.asarray(labels)[keep]))
    groups = [(pad, *(np.concatenate([item[k] for item in items]) for k in range(3))) for pad, items in by_pad.items()]
    chosen = np.zeros(sum(len(b) for _, b, _, _ in groups), dtype=bool)
    if len(chosen):
        chosen[stratified(np.concatenate([labels for *_, labels in groups]), max_boxes)] = True
    offsets = np.cumsum([0] + [len(b) for _, b, _, _ in groups])
    best, best_labels = [], []
    for (pad, boxes, alive, labels), lo, hi in zip(groups, offsets[:-1], offsets[1:]):
        keep = chosen[lo:hi]
        boxes, alive, labels = boxes[keep], alive[keep], labels[keep]
        iou = np.zeros(len(boxes))
        if alive.any():
            grid = anchors.for_image(pad)  # [A, 4]
            live = torch.from_numpy(boxes[alive])
            iou[alive] = torch.cat([pairwise_iou(chunk, grid).amax(dim=1) for chunk in live.split(256)]).numpy()
        best.append(iou)
        best_labels.append(labels)
    ious = np.concatenate(best) if best else np.zeros(0)
    if with_labels:
        return ious, (np.concatenate(best_labels) if best_labels else np.zeros(0, dtype=np.int64))
    return ious


def anchor_coverage(dataset, anchors, matcher: Matcher, min_size: int | None, max_size: int | None,
                    size_divisible: int, max_images: int | None = None, progress: bool = True) -> dict:
    """Per size bucket: boxes, share matched by ``matcher``, share with an anchor at IoU >= ``fg_iou``,
    median best IoU; plus box-size and aspect-ratio distributions. ``anchors`` is an ``AnchorGenerator``.

    With ``max_images`` only that many images, evenly spaced over the dataset, are examined. A list
    ``min_size`` (multi-scale training) is examined at its largest value.
    """
    min_size = examined_min_size(min_size)
    n = len(dataset)
    index = np.arange(n) if not max_images or max_images >= n else np.linspace(0, n - 1, max_images).round().astype(int)
    sizes, matched, strong, best, aspects = [], [], [], [], []
    for i in tqdm(index.tolist(), desc="anchor coverage", disable=not progress, dynamic_ncols=True):
        boxes, _, crowd, pad, alive = _resized_boxes(dataset, i, min_size, max_size, size_divisible)
        keep = ~crowd
        if not keep.any():
            continue
        grid = anchors.for_image(pad)  # [A, 4]
        gt = torch.from_numpy(boxes[alive])  # [M, 4], crowd included (they only make anchors ignored)
        is_crowd = torch.from_numpy(crowd[alive])
        assigned = matcher(grid, gt[None], torch.ones(1, len(gt), dtype=torch.bool), is_crowd[None])[0]  # [A]
        got = torch.zeros(len(gt), dtype=torch.bool)
        got[assigned[assigned >= 0]] = True
        iou = pairwise_iou(gt, grid).amax(dim=1) if len(grid) else torch.zeros(len(gt))  # [M]
        # boxes lost by the transform's min_box_size filter count as uncovered with IoU 0
        full_got, full_iou = np.zeros(len(boxes), bool), np.zeros(len(boxes))
        full_got[alive], full_iou[alive] = got.numpy(), iou.numpy()
        wh = xyxy_to_xywh(boxes[keep])[:, 2:]
        sizes.append(np.sqrt(np.clip(wh[:, 0] * wh[:, 1], 0, None)))
        aspects.append(wh[:, 1] / np.maximum(wh[:, 0], 1e-6))
        matched.append(full_got[keep])
        best.append(full_iou[keep])
    cat = (lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt))  # noqa: E731
    sizes, matched, best, aspects = cat(sizes, float), cat(matched, bool), cat(best, float), cat(aspects, float)
    strong = best >= matcher.fg_iou
    bucket = np.digitize(sizes, SIZE_EDGES[1:-1])
    rows = []
    for k, name in enumerate(bucket_names()):
        sel = bucket == k
        m = int(sel.sum())
        rows.append({"size": name, "boxes": m, "matched": float(matched[sel].mean()) if m else math.nan,
                     "iou_at_fg": float(strong[sel].mean()) if m else math.nan,
                     "median_best_iou": float(np.median(best[sel])) if m else math.nan})
    total = len(sizes)
    return {
        "images_examined": int(len(index)), "boxes": total, "buckets": rows,
        "matched": float(matched.mean()) if total else math.nan,
        "iou_at_fg": float(strong.mean()) if total else math.nan,
        "aspect_ratio_quantiles": {f"p{q}": float(np.percentile(aspects, q)) if total else math.nan
                                   for q in (5, 25, 50, 75, 95)},
        "anchor_sides": sorted({round(v, 1) for level in anchors.sizes_per_level for v in level}),  # sqrt(area)
        "fg_iou": matcher.fg_iou,
    }


def suggested_alpha(dataset) -> dict[str, float]:
    """Per-class focal-loss alpha from the class frequencies (``loss.alpha=auto``)."""
    alpha = alpha_from_counts(dataset.class_counts())
    return {name: round(float(a), 4) for name, a in zip(dataset.class_names, alpha)}


def hints(coverage: dict) -> list[str]:
    """Plain advice for size buckets whose boxes rarely reach a good anchor."""
    out = []
    smallest = min(coverage["anchor_sides"]) if coverage["anchor_sides"] else math.nan
    for row in coverage["buckets"]:
        if row["boxes"] >= max(1, 0.05 * coverage["boxes"]) and row["iou_at_fg"] < 0.5:
            out.append(f"{row['boxes']} boxes of {row['size']} px: only {row['iou_at_fg']:.0%} reach IoU "
                       f">= {coverage['fg_iou']} with an anchor (median best IoU {row['median_best_iou']:.2f}; "
                       f"smallest anchor {smallest} px). Change model.anchors.sizes (or .scale) or the resize "
                       "(data.min_size / data.max_size).")
    return out


def format_report(stats: dict, coverage: dict, alpha: dict[str, float]) -> str:
    lines = [f"images: {stats['images']} ({stats['images_without_boxes']} without boxes), boxes: {stats['boxes']} "
             f"(+{stats['crowd_boxes']} crowd / ignore regions)"]
    dropped = stats["dropped_boxes"]
    if dropped.get("dropped") or dropped.get("clipped"):
        lines.append(f"boxes dropped when loading: {dropped['dropped']} of {dropped['total']}, clipped: "
                     f"{dropped['clipped']}")
    for reason, n in stats["skipped_records"].items():
        lines.append(f"skipped (data.on_error=skip): {n} {reason}")
    width = max([len(n) for n in alpha] + [5])
    lines += ["", f" {'class':<{width}}  {'boxes':>7}  {'share':>6}  alpha"]
    total = max(1, stats["boxes"])
    for name, n in stats["boxes_per_class"].items():
        lines.append(f" {name:<{width}}  {n:>7}  {n / total:>6.1%}  {alpha[name]:.3f}")
    lines += ["", f"anchor coverage on {coverage['images_examined']} images, {coverage['boxes']} boxes "
              f"(box size = sqrt(w*h) after resize; anchor sides {coverage['anchor_sides'][0]}-"
              f"{coverage['anchor_sides'][-1]} px):" if coverage["anchor_sides"] else "",
              f" {'size px':>9}  {'boxes':>7}  {'matched':>7}  {'IoU>=' + str(coverage['fg_iou']):>8}  median IoU"]
    for row in coverage["buckets"]:
        if row["boxes"]:
            lines.append(f" {row['size']:>9}  {row['boxes']:>7}  {row['matched']:>7.1%}  {row['iou_at_fg']:>8.1%}  "
                         f"{row['median_best_iou']:.2f}")
    lines.append(f" {'all':>9}  {coverage['boxes']:>7}  {coverage['matched']:>7.1%}  {coverage['iou_at_fg']:>8.1%}")
    q = coverage["aspect_ratio_quantiles"]
    lines.append(f"box aspect ratio h/w: 5% {q['p5']:.2f}, median {q['p50']:.2f}, 95% {q['p95']:.2f}")
    advice = hints(coverage)
    if stats["images_without_boxes"] == stats["images"]:
        advice.append("no image has a box: check the annotation file and its category ids")
    lines += ["", "hints:" if advice else "hints: none, anchors fit the boxes"] + [f" - {h}" for h in advice]
    return "\n".join(lines)
