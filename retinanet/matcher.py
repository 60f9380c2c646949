"""IoU matching of anchors to ground-truth boxes: foreground / background / ignore, batched.

The IoU matrix ``[B, M, A]`` is never held whole: anchors are processed in chunks of about
``chunk_elements`` IoU values (small enough for the CPU cache, in reused buffers), keeping only
what matching needs, the best gt of every anchor and the best IoU of every gt. The low-quality
rule then revisits only the chunks where a gt reached its best IoU, for that gt alone. Every IoU
is computed with the operations of ``torchvision.ops.box_iou`` in the same order, so the result
is identical to the dense formulation (``tests/test_fast_paths.py`` compares the two).
"""

from __future__ import annotations

import torch
from torch import Tensor

from retinanet.runtime import chunk_elements

BACKGROUND = -1
IGNORE = -2


def _columns(boxes: Tensor) -> tuple[Tensor, ...]:
    """``[..., 4]`` -> four ``[..., 1]`` coordinate columns (x1, y1, x2, y2)."""
    return tuple(boxes[..., i:i + 1] for i in range(4))


def _iou_into(gt: tuple[Tensor, ...], gt_area: Tensor, anc: Tensor, anc_area: Tensor,
              bufs: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """IoU ``[..., C]`` of gt columns ``[..., 1]`` and anchor rows ``anc [4, C]``, written into ``bufs``.

    Returns ``(iou, inter)`` (views of the buffers). Same arithmetic as ``torchvision.ops.box_iou``:
    ``inter = clamp(min(x2) - max(x1), 0) * clamp(min(y2) - max(y1), 0)``,
    ``iou = inter / ((area_gt + area_anchor) - inter)``.
    """
    t1, t2, t3 = bufs
    torch.maximum(gt[0], anc[0], out=t1)
    torch.minimum(gt[2], anc[2], out=t2).sub_(t1).clamp_(min=0)  # width of the intersection
    torch.maximum(gt[1], anc[1], out=t1)
    torch.minimum(gt[3], anc[3], out=t3).sub_(t1).clamp_(min=0)  # height of the intersection
    inter = t2.mul_(t3)
    union = torch.add(gt_area, anc_area, out=t3).sub_(inter)
    return torch.div(inter, union, out=t1), inter


class Matcher:
    """Assigns every anchor of every image a gt index (foreground), ``BACKGROUND`` or ``IGNORE``.

    For each anchor, let ``v`` be its best IoU over the valid, non-crowd gt of its image:
    ``v >= fg_iou`` -> foreground (matched to that gt), ``v < bg_iou`` -> background,
    otherwise ignored.

    ``allow_low_quality``: every valid gt also claims the anchors whose IoU with it equals its
    best IoU (all ties), provided that IoU is > 0 (a gt overlapping no anchor never matches).
    Such an anchor is matched to *that* gt; an anchor that is the best one of several gt goes
    to the one it overlaps most (the lowest index on equal IoU). (torchvision instead gives it
    the anchor's own argmax gt; the two agree unless gt boxes overlap each other heavily.)

    Crowd gt never become targets; background anchors whose intersection with a crowd box
    covers at least ``crowd_ioa`` of the anchor's area are ignored instead.

    ``chunk_elements``: IoU values computed per step (memory / cache trade-off only; None: by device, see
    ``retinanet.runtime.chunk_elements``).
    """

    def __init__(self, fg_iou: float = 0.5, bg_iou: float = 0.4, allow_low_quality: bool = True,
                 crowd_ioa: float = 0.5, chunk_elements: int | None = None):
        if not 0.0 <= bg_iou <= fg_iou <= 1.0:
            raise ValueError(f"bg_iou={bg_iou} and fg_iou={fg_iou}: need 0 <= bg_iou <= fg_iou <= 1")
        self.fg_iou = float(fg_iou)
        self.bg_iou = float(bg_iou)
        self.allow_low_quality = bool(allow_low_quality)
        self.crowd_ioa = float(crowd_ioa)
        self.chunk_elements = None if chunk_elements is None else max(1, int(chunk_elements))

    @torch.no_grad()
    def __call__(self, anchors: Tensor, gt_boxes: Tensor, gt_valid: Tensor, gt_crowd: Tensor | None = None) -> Tensor:
        """``anchors [A, 4]``, ``gt_boxes [B, M, 4]``, ``gt_valid [B, M]``, ``gt_crowd [B, M] | None``
        -> ``matched_idx [B, A]`` int64 (index into M, ``BACKGROUND`` or ``IGNORE``)."""
        batch, num_gt = gt_boxes.shape[:2]
        num_anchors = anchors.shape[0]
        matched = torch.full((batch, num_anchors), BACKGROUND, dtype=torch.int64, device=anchors.device)
        if num_gt == 0 or num_anchors == 0 or batch == 0:
            return matched
        anchors, gt_boxes = anchors.float(), gt_boxes.float()
        crowd = gt_valid & gt_crowd if gt_crowd is not None else torch.zeros_like(gt_valid)
        has_crowd = gt_crowd is not None and bool(crowd.any())
        not_candidate = (~(gt_valid & ~crowd))[..., None]  # [B, M, 1]: never matches (IoU -> -1)
        gt = _columns(gt_boxes)  # 4 x [B, M, 1]
        gt_area = ((gt_boxes[..., 2] - gt_boxes[..., 0]) * (gt_boxes[..., 3] - gt_boxes[..., 1]))[..., None]
        anc = anchors.t().contiguous()  # [A, 4] -> [4, A]: contiguous coordinate rows
        anc_area = (anc[2] - anc[0]) * (anc[3] - anc[1])  # [A]

        budget = self.chunk_elements or chunk_elements(anchors.device)
        step = max(1, min(num_anchors, budget // (batch * num_gt)))
        flat = torch.empty(3, batch * num_gt * step, device=anchors.device)
        best_iou = torch.empty(batch, num_anchors, device=anchors.device)
        best_gt = torch.empty(batch, num_anchors, dtype=torch.int64, device=anchors.device)
        covered = torch.zeros(batch, num_anchors, dtype=torch.bool, device=anchors.device) if has_crowd else None
        starts = list(range(0, num_anchors, step))
        chunk_best = torch.empty(len(starts), batch, num_gt, device=anchors.device)  # best IoU of each gt per chunk
        for c, start in enumerate(starts):
            stop = min(start + step, num_anchors)
            n = stop - start
            bufs = tuple(flat[i, :batch * num_gt * n].view(batch, num_gt, n) for i in range(3))
            iou, inter = _iou_into(gt, gt_area, anc[:, start:stop], anc_area[start:stop], bufs)
            iou.masked_fill_(not_candidate, -1.0)
            torch.amax(iou, dim=2, out=chunk_best[c])
            values, index = iou.max(dim=1)  # [B, n]: best gt of each anchor (first on ties)
            best_iou[:, start:stop] = values
            best_gt[:, start:stop] = index
            if has_crowd:  # intersection over anchor area, crowd gt only
                ioa = inter.div_(anc_area[start:stop]).masked_fill_(~crowd[..., None], 0.0)
                covered[:, start:stop] = ioa.amax(dim=1) >= self.crowd_ioa

        matched = torch.where(best_iou >= self.fg_iou, best_gt, matched)
        matched = torch.where((best_iou >= self.bg_iou) & (best_iou < self.fg_iou), IGNORE, matched)
        if self.allow_low_quality:
            self._low_quality(matched, gt_boxes, gt_area[..., 0], anc, anc_area, chunk_best, starts, step)
        if has_crowd:
            matched = torch.where((matched == BACKGROUND) & covered, IGNORE, matched)
        return matched

    @staticmethod
    def _low_quality(matched: Tensor, gt_boxes: Tensor, gt_area: Tensor, anc: Tensor, anc_area: Tensor,
                     chunk_best: Tensor, starts: list[int], step: int) -> None:
        """Give every gt with best IoU > 0 the anchors reaching it (in place on ``matched [B, A]``).

        An anchor claimed by several gt of its image goes to the highest IoU, then the lowest index.
        """
        num_anchors = anc.shape[1]
        gt_best = chunk_best.amax(dim=0)  # [B, M]
        hits = (chunk_best == gt_best) & (gt_best > 0)  # [chunks, B, M]: chunk holds a best anchor of gt
        found, values = [], []
        for c, b, m in _grouped(hits):
            stop = min(starts[c] + step, num_anchors)
            sel = gt_boxes[b, m]  # [S, 4]
            bufs = tuple(torch.empty(len(b), stop - starts[c], device=anc.device) for _ in range(3))
            iou, _ = _iou_into(_columns(sel), gt_area[b, m][:, None], anc[:, starts[c]:stop],
                               anc_area[starts[c]:stop], bufs)
            s, a = (iou == gt_best[b, m][:, None]).nonzero(as_tuple=True)
            found.append(torch.stack([b[s], m[s], a + starts[c]]))
            values.append(iou[s, a])
        if not found:
            return
        idx = torch.cat(found, dim=1)  # [3, N]: image, gt, anchor of every claim
        value = torch.cat(values)  # [N]
        order = torch.argsort(idx[1], stable=True)  # lowest gt index first ...
        order = order[torch.argsort(value[order], descending=True, stable=True)]  # ... within highest IoU first ...
        key = idx[0, order] * num_anchors + idx[2, order]
        order = order[torch.argsort(key, stable=True)]  # ... within each (image, anchor)
        key = idx[0, order] * num_anchors + idx[2, order]
        first = torch.ones_like(key, dtype=torch.bool)
        first[1:] = key[1:] != key[:-1]
        matched.view(-1)[key[first]] = idx[1, order[first]]


def _grouped(hits: Tensor):
    """``hits [chunks, B, M]`` -> per chunk with a hit: ``(chunk, image indices [S], gt indices [S])``."""
    c, b, m = hits.nonzero(as_tuple=True)
    if len(c) == 0:
        return
    bounds = torch.nonzero(c[1:] != c[:-1]).squeeze(1) + 1
    edges = [0] + bounds.tolist() + [len(c)]
    for lo, hi in zip(edges[:-1], edges[1:]):
        yield int(c[lo]), b[lo:hi], m[lo:hi]
