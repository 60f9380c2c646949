"""Sigmoid focal loss (dense and a memory-lean label-based form), box losses and RetinaNetLoss.

Focal loss (Lin et al. 2017) per element, with ``s = sigmoid(x)`` and target ``t``:
``FL = alpha_t * (1 - p_t)^gamma * CE``, ``p_t = s t + (1 - s)(1 - t)``,
``alpha_t = alpha t + (1 - alpha)(1 - t)``. Everything is computed from the logit:
``1 - p_t = sigmoid(x)(1 - t) + sigmoid(-x) t`` and ``CE = t softplus(-x) + (1 - t) softplus(x)``
(sums of non-negative terms: no cancellation, no clamped probabilities). For hard targets this
is accurate to float32 rounding over the whole logit range, where ``binary_cross_entropy_with_logits``
loses the small losses of well-classified elements (e.g. 1% relative error at ``x = -10, t = 0``).

Label smoothing ``eps`` uses the binary form ``t' = t (1 - eps) + eps / 2``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss

from retinanet.boxes import BoxCoder
from retinanet.matcher import BACKGROUND, Matcher
from retinanet.runtime import chunk_elements

log = logging.getLogger(__name__)
Alpha = float | Tensor | None
BOX_LOSSES = ("smooth_l1", "l1", "giou")
NORMALIZATIONS = ("batch", "torchvision")
PAPER_LOSS = {"alpha": 0.25, "gamma": 2.0, "fg_iou": 0.5, "bg_iou": 0.4}  # Lin et al. 2017


def _alpha_t(alpha: Alpha, t: Tensor | float) -> Tensor | float:
    """``alpha t + (1 - alpha)(1 - t)`` (1 when alpha is None); a ``[K]`` alpha broadcasts on the last dim."""
    return 1.0 if alpha is None else alpha * t + (1 - alpha) * (1 - t)


def _check_alpha(alpha: Alpha, num_classes: int) -> None:
    if torch.is_tensor(alpha):
        if alpha.shape != (num_classes,):
            raise ValueError(f"focal loss: per-class alpha has shape {tuple(alpha.shape)}, "
                             f"expected ({num_classes},) = one value per class")
    elif alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"focal loss: alpha={alpha} must be in [0, 1] (or None to switch it off)")


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: Alpha = 0.25, gamma: float = 2.0,
                       reduction: str = "sum") -> Tensor:
    """Focal loss of ``logits [..., K]`` against (possibly soft) ``targets [..., K]``, in float32 or float64.

    ``alpha``: None (off), a float (positives ``alpha``, negatives ``1 - alpha``) or a tensor ``[K]``
    (per class). ``gamma = 0`` with ``alpha = None`` is exactly ``binary_cross_entropy_with_logits``.
    fp16 / bf16 inputs are computed and returned in float32. ``reduction``: none / sum / mean.
    """
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"focal loss: reduction={reduction!r} must be 'none', 'sum' or 'mean'")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    x, t = logits.to(dtype), targets.to(dtype)
    _check_alpha(alpha, x.shape[-1])
    if gamma == 0 and alpha is None:
        loss = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    else:
        one_minus_pt = torch.sigmoid(x) * (1 - t) + torch.sigmoid(-x) * t
        ce = t * F.softplus(-x) + (1 - t) * F.softplus(x)
        loss = _alpha_t(alpha, t) * one_minus_pt.pow(gamma) * ce
    if reduction == "sum":
        return loss.sum()
    return loss.mean() if reduction == "mean" else loss


def _focal_terms(x: Tensor, t: float, a: Tensor | float, gamma: float, grad: bool) -> Tensor:
    """Focal loss (``grad=False``) or its derivative w.r.t. ``x`` (``grad=True``) for a constant target ``t``.

    Hard target: with ``z = x`` (t = 0) or ``z = -x`` (t = 1), ``FL = a sigmoid(z)^gamma softplus(z)`` and
    ``dFL/dz = a sigmoid(z)^gamma (gamma sigmoid(-z) softplus(z) + sigmoid(z))``; ``dFL/dx = +-dFL/dz``.
    Soft target: ``q = 1 - p_t``, ``dq/dx = s (1 - s)(1 - 2t)``, ``dCE/dx = s - t``, so
    ``dFL/dx = a (gamma q^(gamma-1) s (1 - s)(1 - 2t) CE + q^gamma (s - t))``.
    """
    if t in (0.0, 1.0):
        z = x if t == 0.0 else -x
        s, ce = torch.sigmoid(z), F.softplus(z)
        mod = s.pow(gamma)
        if not grad:
            return a * mod * ce
        dz = a * mod * (gamma * torch.sigmoid(-z) * ce + s)
        return dz if t == 0.0 else -dz
    s, s_neg = torch.sigmoid(x), torch.sigmoid(-x)
    q = s * (1 - t) + s_neg * t
    ce = t * F.softplus(-x) + (1 - t) * F.softplus(x)
    if not grad:
        return a * q.pow(gamma) * ce
    return a * (gamma * q.pow(gamma - 1) * s * s_neg * (1 - 2 * t) * ce + q.pow(gamma) * (s - t))





def _label_terms(x: Tensor, labels: Tensor, alpha: Alpha, gamma: float, eps: float,
                 row_weight: Tensor | None, grad: bool, scale: Tensor | float = 1.0) -> Tensor:
    """Summed loss, or the weighted gradient ``[N, K]`` times ``scale``, of ``x [N, K]`` against ``labels [N]``.

    Row chunks of about ``chunk_elements(device)`` logits are treated as all negative (hard targets: one
    sigmoid and one softplus per logit, the rest fused multiplies), the foreground entries (one per
    foreground row) are computed apart and replace theirs. So the only ``[N, K]`` tensor ever
    allocated is the returned gradient. ``tests/test_fast_paths.py`` checks this against the dense
    formula; the hard-target gradient uses ``1 - sigmoid(x)`` for ``sigmoid(-x)`` (float rounding only).
    """
    x = x.contiguous()
    n, k = x.shape
    t_neg, t_pos = 0.5 * eps, 1.0 - 0.5 * eps
    weight = (labels >= BACKGROUND).to(x.dtype)  # [N]: ignored rows (IGNORE = -2) weigh 0
    if row_weight is not None:
        weight = weight * row_weight.to(x.dtype)
    if grad:
        weight = weight * scale
    rows = torch.nonzero(labels >= 0).squeeze(1)  # [P] foreground rows, ascending
    cols = labels[rows]  # [P] their classes
    a_pos = _alpha_t(alpha, t_pos)
    a_pos = a_pos[cols] if torch.is_tensor(a_pos) else a_pos
    a_neg = _alpha_t(alpha, t_neg)  # float or [K]
    pos = _focal_terms(x[rows, cols], t_pos, a_pos, gamma, grad) * weight[rows]  # [P]
    out = torch.empty_like(x) if grad else None
    step = max(1, chunk_elements(x.device) // max(1, k))
    starts = list(range(0, n, step))
    bounds = torch.searchsorted(rows, torch.tensor(starts + [n], device=rows.device)).tolist()  # positives per chunk
    sums = torch.zeros(len(starts) + 1, dtype=torch.float64, device=x.device)
    for i, start in enumerate(starts):
        xc, wc = x[start:start + step], weight[start:start + step, None]  # [C, K], [C, 1]
        r = rows[bounds[i]:bounds[i + 1]] - start
        c = cols[bounds[i]:bounds[i + 1]]
        if t_neg == 0.0:  # FL = a s^gamma softplus(x), dFL/dx = a s^gamma (gamma (1 - s) softplus(x) + s)
            s, ce = torch.sigmoid(xc), F.softplus(xc)
            w = (s * s if gamma == 2.0 else s.pow(gamma)).mul_(wc * a_neg)  # [C, K]
            w[r, c] = 0.0  # foreground entries come from `pos`
            if grad:
                oc = torch.neg(s, out=out[start:start + step]).add_(1.0)
                torch.addcmul(s, oc, ce, value=gamma, out=oc).mul_(w)
            else:
                sums[i] = torch.dot(w.view(-1), ce.view(-1))
        else:  # soft targets (label smoothing): the general formula
            terms = _focal_terms(xc, t_neg, a_neg, gamma, grad).mul_(wc)
            terms[r, c] = 0.0
            if grad:
                out[start:start + step] = terms
            else:
                sums[i] = terms.sum()
    if grad:
        out[rows, cols] = pos
        return out
    sums[-1] = pos.sum()
    return sums.sum().to(x.dtype)


class FocalLossFromLabels(torch.autograd.Function):
    """Summed focal loss of ``logits [N, K]`` against ``labels [N]`` with an analytic backward.

    ``labels``: class index (that class positive, the others negative), ``BACKGROUND`` (-1: all
    negative) or ``IGNORE`` (-2: no loss). Optional ``row_weight [N]`` scales each row. Only the
    logits, labels and weights are saved; no one-hot target and no graph of temporaries is kept.
    Call as ``FocalLossFromLabels.apply(logits, labels, alpha, gamma, label_smoothing, row_weight)``.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, alpha: Alpha = 0.25, gamma: float = 2.0,
                label_smoothing: float = 0.0, row_weight: Tensor | None = None) -> Tensor:
        _check_alpha(alpha, logits.shape[-1])
        if torch.is_tensor(alpha):  # a per-class alpha follows the logits (a CPU buffer must not meet CUDA logits)
            alpha = alpha.to(device=logits.device, dtype=torch.float32)
        ctx.save_for_backward(logits, labels, row_weight, alpha if torch.is_tensor(alpha) else None)
        ctx.alpha, ctx.gamma, ctx.eps = (None if torch.is_tensor(alpha) else alpha), gamma, label_smoothing
        x = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return _label_terms(x, labels, alpha, gamma, label_smoothing, row_weight, grad=False)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits, labels, row_weight, alpha_k = ctx.saved_tensors
        alpha = alpha_k if alpha_k is not None else ctx.alpha
        x = logits.to(torch.promote_types(logits.dtype, torch.float32))
        grad = _label_terms(x, labels, alpha, ctx.gamma, ctx.eps, row_weight, grad=True, scale=grad_out)
        return grad.to(logits.dtype), None, None, None, None, None


def box_regression_loss(kind: str, pred: Tensor, anchors: Tensor, gt: Tensor, coder: BoxCoder,
                        beta: float) -> Tensor:
    """Per-anchor box loss ``[P]`` of deltas ``pred [P, 4]`` for ``anchors [P, 4]`` matched to ``gt [P, 4]``.

    ``smooth_l1`` (``beta = 0`` is plain L1; torch handles it without dividing by zero), ``l1``,
    or ``giou`` (1 - generalised IoU of the decoded boxes).
    """
    if kind == "giou":
        return generalized_box_iou_loss(coder.decode(pred, anchors), gt, reduction="none")
    target = coder.encode(anchors, gt)
    if kind == "l1":
        return F.l1_loss(pred, target, reduction="none").sum(-1)
    return F.smooth_l1_loss(pred, target, reduction="none", beta=beta).sum(-1)


def alpha_from_counts(counts: Sequence[float] | Tensor, base: float = 0.25, power: float = 0.5) -> Tensor:
    """Per-class alpha ``[K]`` from class frequencies (``loss.alpha=auto``).

    The odds ``alpha / (1 - alpha)`` of ``base`` are multiplied by ``(mean count / count_k) ** power``:
    a rare class weighs its positives more and its negatives less; balanced classes all get ``base``.
    """
    n = torch.as_tensor(counts, dtype=torch.float64).clamp(min=1)
    odds = base / (1 - base) * (n.mean() / n) ** power
    return (odds / (1 + odds)).float()


class Targets(NamedTuple):
    """What matching assigned to every anchor of a batch."""

    matched: Tensor   # [B, A] index of the matched gt box, BACKGROUND (-1) or IGNORE (-2)
    labels: Tensor    # [B, A] class of the matched box, or BACKGROUND / IGNORE
    num_pos: Tensor   # [B] foreground anchors per image (float)


class RetinaNetLoss(nn.Module):
    """Matching + focal loss over non-ignored anchors + box loss over foreground anchors.

    ``normalization="batch"``: both sums are divided by the number of foreground anchors of the
    whole batch (clamped >= 1); the caller may pass that number for a larger batch than the one given
    (``normalizer``: every micro-batch of an accumulated step, every rank under DDP).
    ``normalization="torchvision"``: each image's sums are divided by its own foreground count
    (clamped >= 1) and the images averaged, as ``torchvision`` RetinaNetHead.compute_loss does.

    ``alpha``: a number, None (off), a list of one value per class, or ``"auto"``: per class from
    ``class_counts`` (the training set's boxes per class, which the trainer passes; see ``alpha_from_counts``).
    Every argument is checked here: a bad value raises ``ValueError`` naming the argument.
    """

    def __init__(self, num_classes: int, alpha: Alpha | Sequence[float] | str = 0.25, gamma: float = 2.0,
                 box_loss: str = "smooth_l1", beta: float = 0.1, cls_weight: float = 1.0, box_weight: float = 1.0,
                 label_smoothing: float = 0.0, matcher: Matcher | None = None, coder: BoxCoder | None = None,
                 normalization: str = "batch", class_counts: Sequence[float] | None = None):
        super().__init__()
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"box_loss={box_loss!r} must be one of {list(BOX_LOSSES)}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization={normalization!r} must be one of {list(NORMALIZATIONS)}")
        for name, value in (("gamma", gamma), ("beta", beta), ("cls_weight", cls_weight), ("box_weight", box_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name}={value!r} must be a number >= 0")
        if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
                or not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={label_smoothing!r} must be a number in [0, 1)")
        class_alpha = None
        if isinstance(alpha, str):
            if alpha != "auto":
                raise ValueError(f"alpha={alpha!r} must be a number in [0, 1], null, auto or a list of "
                                 f"{num_classes} numbers")
            if class_counts is None:
                raise ValueError("alpha=auto needs the training set's class counts (the trainer passes them)")
            class_alpha = alpha_from_counts(class_counts)
            log.info("loss.alpha=auto -> %s", [round(float(a), 3) for a in class_alpha])
            alpha = None
        elif alpha is not None and not isinstance(alpha, (int, float)):
            values = list(alpha) if not torch.is_tensor(alpha) else alpha.tolist()
            if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1 for v in values):
                raise ValueError(f"alpha={values} must hold numbers in [0, 1], one per class")
            class_alpha = torch.as_tensor(values, dtype=torch.float32)
            _check_alpha(class_alpha, num_classes)
            alpha = None
        elif alpha is not None:
            if isinstance(alpha, bool) or not 0.0 <= alpha <= 1.0:
                raise ValueError(f"alpha={alpha!r} must be a number in [0, 1], null, auto or a list of "
                                 f"{num_classes} numbers")
            alpha = float(alpha)
        self.register_buffer("class_alpha", class_alpha, persistent=False)
        self._class_alpha_values = None if class_alpha is None else [round(float(a), 3) for a in class_alpha]
        self.num_classes, self.alpha, self.gamma = int(num_classes), alpha, float(gamma)
        self.box_loss, self.beta, self.label_smoothing = box_loss, float(beta), float(label_smoothing)
        self.cls_weight, self.box_weight, self.normalization = float(cls_weight), float(box_weight), normalization
        self.matcher = matcher if matcher is not None else Matcher()
        self.coder = coder if coder is not None else BoxCoder()

    def describe(self) -> str:
        """One line for the run log: the values in use, with the paper's where they differ."""
        alpha = self.alpha if self._class_alpha_values is None else f"per class {self._class_alpha_values}"
        m = self.matcher
        box = self.box_loss + (f" (beta {self.beta:g})" if self.box_loss == "smooth_l1" else "")
        text = (f"sigmoid focal alpha {alpha}, gamma {self.gamma:g}"
                + (f", label smoothing {self.label_smoothing:g}" if self.label_smoothing else "")
                + f"; box {box}; matcher fg_iou {m.fg_iou:g} / bg_iou {m.bg_iou:g}")
        ours = {"alpha": self.alpha, "gamma": self.gamma, "fg_iou": m.fg_iou, "bg_iou": m.bg_iou}
        if ours != PAPER_LOSS:
            p = {k: f"{v:g}" for k, v in PAPER_LOSS.items()}
            text += (f" (the paper: alpha {p['alpha']}, gamma {p['gamma']}, matcher {p['fg_iou']} / {p['bg_iou']}, "
                     "i.e. loss=focal)")
        return text

    def assign(self, anchors: Tensor, gt_boxes: Tensor, gt_labels: Tensor, gt_crowd: Tensor | None = None) -> Targets:
        """Match ``anchors [A, 4]`` to ``gt_boxes [B, M, 4]`` / ``gt_labels [B, M]`` (-1 = padding)."""
        matched = self.matcher(anchors, gt_boxes, gt_labels >= 0, gt_crowd)  # [B, A]
        fg = matched >= 0
        labels = matched
        if gt_labels.shape[1] > 0:
            labels = torch.where(fg, gt_labels.gather(1, matched.clamp(min=0)), matched)  # [B, A] class / -1 / -2
        return Targets(matched, labels, fg.sum(dim=1).float())

    def forward(self, cls_logits: Tensor, box_deltas: Tensor, anchors: Tensor, gt_boxes: Tensor,
                gt_labels: Tensor, gt_crowd: Tensor | None = None, targets: Targets | None = None,
                normalizer: Tensor | float | None = None) -> dict[str, Tensor]:
        """``cls_logits [B, A, K]``, ``box_deltas [B, A, 4]``, ``anchors [A, 4]``, ``gt_boxes [B, M, 4]``,
        ``gt_labels [B, M]`` (-1 = padding), ``gt_crowd [B, M] | None`` -> ``dict(loss, loss_cls, loss_box,
        num_pos)``; ``num_pos`` is this batch's foreground anchor count. ``targets``: matching done already
        (``assign``); ``normalizer``: the positives to divide by under ``normalization="batch"`` (default:
        this batch's, clamped >= 1)."""
        batch, num_anchors, num_classes = cls_logits.shape
        if num_classes != self.num_classes:
            raise ValueError(f"loss: cls_logits have {num_classes} classes, the loss was built for {self.num_classes}")
        if anchors.shape[0] != num_anchors:
            raise ValueError(f"loss: {anchors.shape[0]} anchors for outputs of {num_anchors} anchors")
        if gt_labels.numel() and int(gt_labels.max()) >= num_classes:
            raise ValueError(f"loss: gt label {int(gt_labels.max())} out of range for {num_classes} classes")
        matched, labels, num_fg = targets if targets is not None else self.assign(anchors, gt_boxes, gt_labels,
                                                                                  gt_crowd)
        fg = matched >= 0
        b_idx, a_idx = fg.nonzero(as_tuple=True)  # [P] each
        per_box = box_regression_loss(self.box_loss, box_deltas[b_idx, a_idx], anchors[a_idx],
                                      gt_boxes[b_idx, matched[b_idx, a_idx]], self.coder, self.beta)  # [P]
        alpha = self.class_alpha if self.class_alpha is not None else self.alpha
        flat_logits = cls_logits.reshape(batch * num_anchors, num_classes)  # [B, A, K] -> [B*A, K]
        if self.normalization == "batch":
            norm = num_fg.sum().clamp(min=1.0) if normalizer is None else normalizer
            loss_cls = FocalLossFromLabels.apply(flat_logits, labels.reshape(-1), alpha, self.gamma,
                                                 self.label_smoothing, None) / norm
            loss_box = per_box.sum() / norm
        else:
            image_weight = 1.0 / (batch * num_fg.clamp(min=1.0))  # [B]
            row_weight = image_weight[:, None].expand(batch, num_anchors).reshape(-1)  # [B, A] -> [B*A]
            loss_cls = FocalLossFromLabels.apply(flat_logits, labels.reshape(-1), alpha, self.gamma,
                                                 self.label_smoothing, row_weight)
            loss_box = (per_box * image_weight[b_idx]).sum()
        loss = self.cls_weight * loss_cls + self.box_weight * loss_box
        return {"loss": loss, "loss_cls": loss_cls, "loss_box": loss_box, "num_pos": num_fg.sum()}
