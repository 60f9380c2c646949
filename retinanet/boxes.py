"""Box formats, clipping, pairwise overlaps and the anchor <-> box delta coder.

All boxes are ``xyxy`` in absolute pixels. Width is ``x2 - x1`` (no ``+1``) and the
centre is ``x1 + 0.5 * width``, as in torchvision, so weights trained there transfer.
COCO's ``xywh`` (top-left corner, width, height) exists only at the borders: annotation files
in, results out; ``xywh_to_xyxy`` / ``xyxy_to_xywh`` are the only conversions.

The conversions take tensors and numpy arrays alike and return the same kind. torch is imported
by the functions that compute with it, not by the module: numpy-only code (the shapes generator's
worker processes, the dataset converters) converts boxes without loading torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor


def _copy(boxes):
    """A copy of ``boxes`` of the same kind: a tensor (same dtype and device), an array (same dtype), or a
    float64 array for a list."""
    if isinstance(boxes, np.ndarray):
        return boxes.copy()
    if hasattr(boxes, "clone"):  # a tensor
        return boxes.clone()
    return np.array(boxes, dtype=np.float64)


def xyxy_to_xywh(boxes):
    """``[..., 4]`` (x1, y1, x2, y2) -> (x, y, w, h) with (x, y) the top-left corner (COCO)."""
    out = _copy(boxes)
    out[..., 2:] -= out[..., :2]
    return out


def xywh_to_xyxy(boxes):
    """``[..., 4]`` (x, y, w, h) with (x, y) the top-left corner (COCO) -> (x1, y1, x2, y2)."""
    out = _copy(boxes)
    out[..., 2:] += out[..., :2]
    return out


def clip_boxes(boxes: Tensor, hw: Sequence[float] | Tensor) -> Tensor:
    """Clamp ``boxes [..., 4]`` to ``[0, w] x [0, h]``.

    ``hw`` is ``(h, w)`` or a tensor ``[..., 2]`` that broadcasts against ``boxes[..., :1]``
    after indexing (e.g. ``[B, 1, 2]`` for boxes ``[B, N, 4]``), to clip a batch at once.
    """
    import torch

    hw = torch.as_tensor(hw, dtype=boxes.dtype, device=boxes.device)
    h, w = hw[..., 0:1], hw[..., 1:2]
    x = torch.minimum(boxes[..., 0::2].clamp(min=0), w)  # [..., 2]: x1, x2
    y = torch.minimum(boxes[..., 1::2].clamp(min=0), h)  # [..., 2]: y1, y2
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """``[..., 4] -> [...]``."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def pairwise_intersection(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Intersection areas ``[..., N, 4] x [..., M, 4] -> [..., N, M]`` (leading dims broadcast).

    Computed one axis at a time, so the peak memory is a few ``[..., N, M]`` tensors
    (never ``[..., N, M, 2]``); the arithmetic is the same as ``torchvision.ops.box_iou``.
    """
    import torch

    a, b = boxes1.unsqueeze(-2), boxes2.unsqueeze(-3)  # [..., N, 1, 4], [..., 1, M, 4]
    iw = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    ih = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    return iw * ih


def pairwise_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU ``[..., N, 4] x [..., M, 4] -> [..., N, M]``; equals ``torchvision.ops.box_iou`` for 2-D inputs."""
    inter = pairwise_intersection(boxes1, boxes2)
    union = box_area(boxes1).unsqueeze(-1) + box_area(boxes2).unsqueeze(-2) - inter
    return inter / union


class BoxCoder:
    """Encodes gt boxes as deltas ``(dx, dy, dw, dh)`` relative to anchors, and decodes them back.

    ``dx = wx * (gx - ax) / aw``, ``dw = ww * log(gw / aw)`` (same for y / h). On decode,
    ``dw`` and ``dh`` are clamped at ``clamp`` so ``exp`` cannot overflow. Same arithmetic as
    ``torchvision.models.detection._utils.BoxCoder``; all functions broadcast over leading dims.
    """

    def __init__(self, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), clamp: float = math.log(1000.0 / 16)):
        if len(weights) != 4:
            raise ValueError(f"BoxCoder weights must have 4 values (wx, wy, ww, wh), got {list(weights)}")
        self.weights = tuple(float(w) for w in weights)
        self.clamp = float(clamp)

    def encode(self, anchors: Tensor, gt: Tensor) -> Tensor:
        """``anchors [..., 4]``, ``gt [..., 4]`` -> ``deltas [..., 4]``."""
        import torch

        wx, wy, ww, wh = self.weights
        aw = anchors[..., 2] - anchors[..., 0]
        ah = anchors[..., 3] - anchors[..., 1]
        ax = anchors[..., 0] + 0.5 * aw
        ay = anchors[..., 1] + 0.5 * ah
        gw = gt[..., 2] - gt[..., 0]
        gh = gt[..., 3] - gt[..., 1]
        gx = gt[..., 0] + 0.5 * gw
        gy = gt[..., 1] + 0.5 * gh
        dx = wx * (gx - ax) / aw
        dy = wy * (gy - ay) / ah
        dw = ww * torch.log(gw / aw)
        dh = wh * torch.log(gh / ah)
        return torch.stack([dx, dy, dw, dh], dim=-1)

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """``deltas [..., 4]``, ``anchors [..., 4]`` -> ``boxes [..., 4]`` (xyxy, dtype of ``deltas``)."""
        import torch

        wx, wy, ww, wh = self.weights
        anchors = anchors.to(deltas.dtype)
        aw = anchors[..., 2] - anchors[..., 0]
        ah = anchors[..., 3] - anchors[..., 1]
        ax = anchors[..., 0] + 0.5 * aw
        ay = anchors[..., 1] + 0.5 * ah
        dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
        dw = (deltas[..., 2] / ww).clamp(max=self.clamp)
        dh = (deltas[..., 3] / wh).clamp(max=self.clamp)
        cx, cy = dx * aw + ax, dy * ah + ay
        half_w, half_h = 0.5 * (torch.exp(dw) * aw), 0.5 * (torch.exp(dh) * ah)
        return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1)
