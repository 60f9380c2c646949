"""Raw head outputs -> detections per image: top-k per level, decode, clip, class-wise NMS, rescale."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import batched_nms

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
        scores, anchor_idx, labels = [], [], []
        start = 0
        for count in num_anchors_per_level:
            logits = cls_logits[:, start:start + count].reshape(batch, count * num_classes)  # [B, A_l, K] -> [B, A_l*K]
            top, idx = logits.topk(min(self.topk_candidates, count * num_classes), dim=1)  # [B, k]
            scores.append(torch.sigmoid(top.float()))  # sigmoid is monotonic: top-k of logits = of scores
            anchor_idx.append(start + torch.div(idx, num_classes, rounding_mode="floor"))
            labels.append(idx % num_classes)
            start += count
        return torch.cat(scores, 1), torch.cat(anchor_idx, 1), torch.cat(labels, 1)

    @torch.no_grad()
    def __call__(self, cls_logits: Tensor, box_deltas: Tensor, anchors: Tensor, num_anchors_per_level: Sequence[int],
                 image_sizes: Tensor | Sequence[Sequence[int]], scales: Tensor | None = None) -> list[dict[str, Tensor]]:
        """``image_sizes [B, 2]``: (h, w) of each resized, un-padded image; ``scales [B, 2]`` (sy, sx) or ``[B]``:
        resized / original size, or None to stay in resized coordinates.

        Returns per image ``dict(boxes [N, 4] float32 xyxy, scores [N] float32, labels [N] int64)``, sorted by score.
        """
        batch, _, num_classes = cls_logits.shape
        device = cls_logits.device
        sizes = torch.as_tensor(image_sizes, dtype=torch.float32, device=device).reshape(batch, 2)
        scores, anchor_idx, labels = self._candidates(cls_logits, num_anchors_per_level)  # [B, C] each
        deltas = box_deltas.gather(1, anchor_idx[..., None].expand(-1, -1, 4))  # [B, C, 4]
        boxes = self.coder.decode(deltas.float(), anchors[anchor_idx])  # [B, C, 4]
        boxes = clip_boxes(boxes, sizes[:, None, :])  # sizes [B, 2] -> [B, 1, 2]

        img, cand = (scores > self.score_thresh).nonzero(as_tuple=True)  # [N] each
        boxes, scores, labels = boxes[img, cand], scores[img, cand], labels[img, cand]
        keep = batched_nms(boxes, scores, img * num_classes + labels, self.nms_thresh)  # by decreasing score

        if scales is not None:
            scales = torch.as_tensor(scales, dtype=torch.float32, device=device)
            scales = scales[:, None].expand(batch, 2) if scales.ndim == 1 else scales  # [B] -> [B, 2]
        results = []
        for b in range(batch):
            k = keep[img[keep] == b][: self.detections_per_img]
            det_boxes = boxes[k]
            if scales is not None:
                sy, sx = scales[b, 0], scales[b, 1]
                det_boxes = det_boxes / torch.stack([sx, sy, sx, sy])
                det_boxes = clip_boxes(det_boxes, sizes[b] / scales[b])
            results.append({"boxes": det_boxes, "scores": scores[k], "labels": labels[k]})
        return results
