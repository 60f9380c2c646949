"""Raw head outputs -> detections per image: top-k per level, decode, clip, class-wise NMS, rescale.

Two forms of the same steps: ``PostProcessor.__call__`` (a list of per-image results, mapped back to the
original images: training's evaluation, evaluate, infer) and ``PostProcessor.padded`` (fixed-shape tensors
``[B, D, ...]`` plus a count, in the resized images' pixels: the graph exported by ``retinanet.deploy.export``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import batched_nms, nms

from retinanet.boxes import BoxCoder, clip_boxes


class PostProcessor:
    """Turns ``cls_logits [B, A, K]`` and ``box_deltas [B, A, 4]`` into per-image detections.

    Per level: the ``topk_candidates`` best (anchor, class) pairs whose probability is above
    ``score_thresh`` are decoded and clipped to the resized image. Then class-wise NMS at
    ``nms_thresh``, the ``detections_per_img`` best are kept and mapped back to the original
    image (x / sx, y / sy, clipped to the original size). Same result as torchvision's
    ``RetinaNet.postprocess_detections``, with the top-k and decoding batched over images.
    """

    def __init__(self, score_thresh: float = 0.05, topk_candidates: int = 1000, nms_thresh: float = 0.5,
                 detections_per_img: int = 100, coder: BoxCoder | None = None):
        for name, value, lo, hi in (("score_thresh", score_thresh, 0, 1), ("nms_thresh", nms_thresh, 0, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise ValueError(f"{name}={value!r} must be a number in [{lo}, {hi}]")
        for name, value in (("topk_candidates", topk_candidates), ("detections_per_img", detections_per_img)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        self.score_thresh = float(score_thresh)
        self.topk_candidates = int(topk_candidates)
        self.nms_thresh = float(nms_thresh)
        self.detections_per_img = int(detections_per_img)
        self.coder = coder if coder is not None else BoxCoder()

    def _candidates(self, cls_logits: Tensor, num_anchors_per_level: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        """Top-k (anchor, class) pairs per level -> ``scores, anchor_idx, labels``, each ``[B, C]``."""
        batch, num_anchors, num_classes = cls_logits.shape
        if sum(num_anchors_per_level) != num_anchors:
            raise ValueError(f"postprocess: num_anchors_per_level {list(num_anchors_per_level)} sums to "
                             f"{sum(num_anchors_per_level)}, but the outputs have {num_anchors} anchors")
        flat = cls_logits.reshape(batch, num_anchors * num_classes)  # [B, A, K] -> [B, A*K]
        scores, anchor_idx, labels = [], [], []
        start = 0
        for count in num_anchors_per_level:
            logits = flat[:, start * num_classes:(start + count) * num_classes]  # level l: [B, A_l*K], no copy
            top, idx = logits.topk(torch.sym_min(self.topk_candidates, count * num_classes), dim=1)  # [B, k]
            scores.append(torch.sigmoid(top.float()))  # sigmoid is monotonic: top-k of logits = of scores
            anchor_idx.append(start + torch.div(idx, num_classes, rounding_mode="floor"))
            labels.append(idx % num_classes)
            start += count
        return torch.cat(scores, 1), torch.cat(anchor_idx, 1), torch.cat(labels, 1)

    def _decoded(self, cls_logits: Tensor, box_deltas: Tensor, anchors: Tensor, num_anchors_per_level: Sequence[int],
                 sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The top-k candidates of every level, decoded and clipped to ``sizes [B, 2]`` (h, w):
        ``boxes [B, C, 4], scores [B, C], labels [B, C], anchor_idx [B, C]``."""
        scores, anchor_idx, labels = self._candidates(cls_logits, num_anchors_per_level)  # [B, C] each
        deltas = box_deltas.gather(1, anchor_idx[..., None].expand(-1, -1, 4))  # [B, C, 4]
        boxes = self.coder.decode(deltas.float(), anchors[anchor_idx])  # [B, C, 4]
        return clip_boxes(boxes, sizes[:, None, :]), scores, labels, anchor_idx  # sizes [B, 2] -> [B, 1, 2]

    @torch.no_grad()
    def __call__(self, cls_logits: Tensor, box_deltas: Tensor, anchors: Tensor, num_anchors_per_level: Sequence[int],
                 image_sizes: Tensor | Sequence[Sequence[int]], scales: Tensor | None = None) -> list[dict[str, Tensor]]:
        """``image_sizes [B, 2]``: (h, w) of each resized, un-padded image; ``scales [B, 2]`` (sy, sx) or ``[B]``:
        resized / original size, or None to stay in resized coordinates.

        Returns per image ``dict(boxes [N, 4] float32 xyxy, scores [N] float32, labels [N] int64)``, sorted by score.

        Each image's detections depend on its own outputs only, not on the batch it came in: NMS runs image by
        image, and equal scores (common in bf16, whose logits take few values) are ordered by (anchor, class)
        index, not by the sort's whim, in NMS and in the result.
        """
        batch, _, num_classes = cls_logits.shape
        device = cls_logits.device
        sizes = torch.as_tensor(image_sizes, dtype=torch.float32, device=device).reshape(batch, 2)
        boxes, scores, labels, anchor_idx = self._decoded(cls_logits, box_deltas, anchors, num_anchors_per_level, sizes)
        if scales is not None:
            scales = torch.as_tensor(scales, dtype=torch.float32, device=device)
            scales = scales[:, None].expand(batch, 2) if scales.ndim == 1 else scales  # [B] -> [B, 2]
        results = []
        for b in range(batch):
            cand = (scores[b] > self.score_thresh).nonzero().squeeze(1)  # [N]
            order = (anchor_idx[b, cand] * num_classes + labels[b, cand]).argsort()  # by (anchor, class) ...
            order = order[scores[b, cand[order]].argsort(descending=True, stable=True)]  # ... within equal scores
            cand = cand[order]
            rank = torch.arange(len(cand), 0, -1, dtype=torch.float32, device=device)  # distinct: NMS keeps this order
            k = cand[batched_nms(boxes[b, cand], rank, labels[b, cand], self.nms_thresh)[: self.detections_per_img]]
            det_boxes = boxes[b, k] if scales is None else to_original(boxes[b, k], sizes[b], scales[b])
            results.append({"boxes": det_boxes, "scores": scores[b, k], "labels": labels[b, k]})
        return results

    def padded(self, cls_logits: Tensor, box_deltas: Tensor, anchors: Tensor, num_anchors_per_level: Sequence[int],
               image_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The detections of ``__call__`` (``scales=None``) as fixed-shape tensors, in tensor operations only (no
        loop over images, no branch on the data), so that ``torch.export`` / ONNX capture them for any batch and
        image size. ``image_sizes [B, 2]`` (h, w) of each resized, un-padded image.

        Returns ``boxes [B, D, 4]`` (xyxy, resized-image pixels), ``scores [B, D]``, ``labels [B, D]`` (int64) and
        ``num_detections [B]`` (int64), ``D = detections_per_img``; each image's first ``num_detections`` rows
        hold its detections by decreasing score, the rest are padding (boxes and scores 0, labels -1).

        The same candidates and threshold as ``__call__``; the class-wise NMS is ``class_nms`` (exact per image
        and class: ONNX ``NonMaxSuppression`` in an exported graph), where ``__call__``'s ``batched_nms`` shifts
        the boxes of each class apart when it has up to 1000 boxes on the CPU (which costs low bits of the
        coordinates: an IoU within ~1e-5 of ``nms_thresh`` may then be decided the other way).
        """
        batch, _, num_classes = cls_logits.shape
        boxes, scores, labels, _ = self._decoded(cls_logits, box_deltas, anchors, num_anchors_per_level,
                                                 image_sizes.to(torch.float32))
        # candidate c of image b scores in row labels[b, c] only; -1 = not a box of that class or below threshold
        scored = torch.where(scores > self.score_thresh, scores, -1.0)  # [B, C]
        per_class = scores.new_full((batch, num_classes, scores.shape[1]), -1.0)
        per_class = per_class.scatter(1, labels[:, None, :], scored[:, None, :])  # [B, K, C]
        img, labels, cand = class_nms(boxes, per_class, self.nms_thresh).unbind(1)  # [N] each
        boxes, scores = boxes[img, cand], scores[img, cand]
        order = scores.argsort(descending=True)
        img, labels, boxes, scores = img[order], labels[order], boxes[order], scores[order]

        # rank of each detection among those of its image, in order of decreasing score: [N]
        one_hot = (img[:, None] == torch.arange(batch, device=img.device)[None, :]).long()  # [N, B]
        rank = (one_hot.cumsum(0) - 1).gather(1, img[:, None]).squeeze(1)  # [N, B] -> [N, 1] -> [N]
        take = rank < self.detections_per_img
        img, rank = img[take], rank[take]
        out_boxes = boxes.new_zeros((batch, self.detections_per_img, 4))
        out_scores = scores.new_zeros((batch, self.detections_per_img))
        out_labels = labels.new_full((batch, self.detections_per_img), -1)
        out_boxes[img, rank] = boxes[take]
        out_scores[img, rank] = scores[take]
        out_labels[img, rank] = labels[take]
        count = one_hot.sum(0).clamp(max=self.detections_per_img)  # [B]
        return out_boxes, out_scores, out_labels, count


@torch.library.custom_op("retinanet::class_nms", mutates_args=())
def class_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """NMS per image and per class: ``boxes [B, N, 4]`` (xyxy), ``scores [B, K, N]`` (negative: box n is not of
    class k) -> ``[M, 3]`` int64 rows (image, class, box index) of the boxes kept, image by image, class by class,
    each by decreasing score: the semantics of ONNX ``NonMaxSuppression``, which it becomes in an exported graph
    (``retinanet.deploy.export``). Here: ``torchvision.ops.nms`` per (image, class), exact like the group loop of
    ``batched_nms``."""
    rows = [torch.zeros((0, 3), dtype=torch.int64, device=boxes.device)]
    for b, k in (scores >= 0).any(-1).nonzero().tolist():  # the (image, class) pairs with boxes
        idx = (scores[b, k] >= 0).nonzero().squeeze(1)
        keep = idx[nms(boxes[b, idx], scores[b, k, idx], iou_threshold)]
        rows.append(torch.stack([torch.full_like(keep, b), torch.full_like(keep, k), keep], 1))
    return torch.cat(rows)


@class_nms.register_fake
def _class_nms_shape(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    kept = torch.library.get_ctx().new_dynamic_size()  # 0 or more: data-dependent
    return boxes.new_empty((kept, 3), dtype=torch.int64)


def to_original(boxes: Tensor, size: Tensor, scale: Tensor) -> Tensor:
    """Boxes ``[N, 4]`` of a resized image of ``size`` (h, w) -> the original image's pixels: divided by ``scale``
    (sy, sx) = resized / original, clipped to the original size."""
    sy, sx = scale[0], scale[1]
    return clip_boxes(boxes / torch.stack([sx, sy, sx, sy]), size / scale)
