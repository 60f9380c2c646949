"""IoU matching of anchors to ground-truth boxes: foreground / background / ignore, batched."""

from __future__ import annotations

import torch
from torch import Tensor

from retinanet.boxes import box_area, pairwise_intersection

BACKGROUND = -1
IGNORE = -2


class Matcher:
    """Assigns every anchor of every image a gt index (foreground), ``BACKGROUND`` or ``IGNORE``.

    For each anchor, let ``v`` be its best IoU over the valid, non-crowd gt of its image:
    ``v >= fg_iou`` -> foreground (matched to that gt), ``v < bg_iou`` -> background,
    otherwise ignored.

    ``allow_low_quality``: every valid gt also claims the anchors whose IoU with it equals its
    best IoU (all ties), provided that IoU is > 0 (a gt overlapping no anchor never matches).
    Such an anchor is matched to *that* gt; an anchor that is the best one of several gt goes
    to the one it overlaps most. (torchvision instead gives it the anchor's own argmax gt; the
    two agree unless gt boxes overlap each other heavily.)

    Crowd gt never become targets; background anchors whose intersection with a crowd box
    covers at least ``crowd_ioa`` of the anchor's area are ignored instead.
    """

    def __init__(self, fg_iou: float = 0.5, bg_iou: float = 0.4, allow_low_quality: bool = True,
                 crowd_ioa: float = 0.5):
        if not 0.0 <= bg_iou <= fg_iou <= 1.0:
            raise ValueError(f"matcher: need 0 <= bg_iou <= fg_iou <= 1, got bg_iou={bg_iou}, fg_iou={fg_iou}")
        self.fg_iou = float(fg_iou)
        self.bg_iou = float(bg_iou)
        self.allow_low_quality = bool(allow_low_quality)
        self.crowd_ioa = float(crowd_ioa)

    @torch.no_grad()
    def __call__(self, anchors: Tensor, gt_boxes: Tensor, gt_valid: Tensor, gt_crowd: Tensor | None = None) -> Tensor:
        """``anchors [A, 4]``, ``gt_boxes [B, M, 4]``, ``gt_valid [B, M]``, ``gt_crowd [B, M] | None``
        -> ``matched_idx [B, A]`` int64 (index into M, ``BACKGROUND`` or ``IGNORE``)."""
        batch, num_gt = gt_boxes.shape[:2]
        matched = torch.full((batch, anchors.shape[0]), BACKGROUND, dtype=torch.int64, device=anchors.device)
        if num_gt == 0:
            return matched
        anchors, gt_boxes = anchors.float(), gt_boxes.float()
        crowd = gt_valid & gt_crowd if gt_crowd is not None else torch.zeros_like(gt_valid)
        candidate = gt_valid & ~crowd  # [B, M]
        inter = pairwise_intersection(gt_boxes, anchors)  # [B, M, A]
        iou = inter / (box_area(gt_boxes)[..., None] + box_area(anchors) - inter)  # as torchvision.ops.box_iou
        iou = iou.masked_fill_(~candidate[..., None], -1.0)  # [B, M, A]; -1 = never matches

        best_iou, best_gt = iou.max(dim=1)  # [B, A]
        matched = torch.where(best_iou >= self.fg_iou, best_gt, matched)
        matched = torch.where((best_iou >= self.bg_iou) & (best_iou < self.fg_iou), IGNORE, matched)

        if self.allow_low_quality:
            gt_best = iou.amax(dim=2, keepdim=True)  # [B, M, 1]
            is_best = (iou == gt_best) & (gt_best > 0)  # [B, M, A]: ties kept, zero-IoU gt excluded
            lq_iou, lq_gt = iou.masked_fill(~is_best, -1.0).max(dim=1)  # [B, A]
            matched = torch.where(lq_iou > 0, lq_gt, matched)

        if gt_crowd is not None and bool(crowd.any()):
            ioa = (inter / box_area(anchors)).masked_fill(~crowd[..., None], 0.0)  # [B, M, A]
            covered = ioa.amax(dim=1) >= self.crowd_ioa  # [B, A]
            matched = torch.where((matched == BACKGROUND) & covered, IGNORE, matched)
        return matched
