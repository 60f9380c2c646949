"""Focal loss (dense and label-based) against float64 formulas and torchvision; RetinaNetLoss end to end."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.detection._utils import Matcher as TvMatcher
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import box_iou, generalized_box_iou_loss

from retinanet.anchors import AnchorGenerator
from retinanet.boxes import BoxCoder
from retinanet.losses import FocalLossFromLabels, RetinaNetLoss, alpha_from_counts, sigmoid_focal_loss
from retinanet.matcher import IGNORE, Matcher

TINY = 1e-37  # float32 underflows below ~1e-38: results there can only be compared absolutely


def reference_focal(x, t, alpha, gamma):
    """The focal loss written out in float64: -alpha_t (1 - p_t)^gamma log(p_t), with soft t allowed."""
    x, t = x.double(), t.double()
    p, one_minus_p = 1 / (1 + torch.exp(-x)), 1 / (1 + torch.exp(x))
    log_p, log_one_minus_p = -torch.log1p(torch.exp(-x)), -torch.log1p(torch.exp(x))
    one_minus_pt = p * (1 - t) + one_minus_p * t
    log_pt = t * log_p + (1 - t) * log_one_minus_p  # cross entropy = -log_pt (soft targets too)
    alpha_t = 1.0 if alpha is None else alpha * t + (1 - alpha) * (1 - t)
    return -alpha_t * one_minus_pt**gamma * log_pt


def grid_logits():
    """Logits over [-50, 50] x hard targets 0 / 1: ``[201, 2]``."""
    x = torch.linspace(-50, 50, 201)[:, None].expand(201, 2).contiguous()
    return x, torch.tensor([0.0, 1.0]).expand(201, 2)


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (None, 2.0), (0.5, 1.5), (0.25, 0.0), (0.9, 3.0)])
def test_dense_matches_float64_formula_over_whole_range(alpha, gamma):
    x, t = grid_logits()
    got = sigmoid_focal_loss(x, t, alpha, gamma, reduction="none")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference_focal(x, t, alpha, gamma), rtol=1e-6, atol=TINY)


def test_label_smoothing_matches_float64_formula():
    x, t = grid_logits()
    eps = 0.1
    soft = t * (1 - eps) + 0.5 * eps
    got = sigmoid_focal_loss(x, soft, 0.25, 2.0, reduction="none")
    torch.testing.assert_close(got.double(), reference_focal(x, soft, 0.25, 2.0), rtol=1e-6, atol=TINY)
    labels = torch.full((201,), -1)
    labels_pos = torch.zeros(201, dtype=torch.long)
    lean = (FocalLossFromLabels.apply(x[:, :1], labels, 0.25, 2.0, eps, None)
            + FocalLossFromLabels.apply(x[:, 1:], labels_pos, 0.25, 2.0, eps, None))
    torch.testing.assert_close(lean.double(), reference_focal(x, soft, 0.25, 2.0).sum(), rtol=1e-6, atol=0)


def test_gamma0_alpha_none_is_exactly_bce():
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(50, 7, generator=g) * 5, torch.rand(50, 7, generator=g)
    assert torch.equal(sigmoid_focal_loss(x, t, None, 0.0, "none"), F.binary_cross_entropy_with_logits(x, t, reduction="none"))
    assert torch.equal(sigmoid_focal_loss(x, t, None, 0.0, "mean"), F.binary_cross_entropy_with_logits(x, t))


def test_matches_torchvision_values_and_gradients():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(64, 5, generator=g) * 3).requires_grad_()
    t = (torch.rand(64, 5, generator=g) < 0.2).float()
    for alpha, gamma in ((0.25, 2.0), (0.75, 1.0)):
        ours = sigmoid_focal_loss(x, t, alpha, gamma, "sum")
        (g_ours,) = torch.autograd.grad(ours, x)
        tv = torchvision.ops.sigmoid_focal_loss(x, t, alpha, gamma, reduction="sum")
        (g_tv,) = torch.autograd.grad(tv, x)
        torch.testing.assert_close(ours, tv, rtol=1e-5, atol=0)
        torch.testing.assert_close(g_ours, g_tv, rtol=1e-5, atol=1e-7)


def test_gradient_finite_and_nonzero_at_misclassified_extremes():
    x = torch.tensor([[50.0], [-50.0]], requires_grad=True)  # row 0 is negative, row 1 positive
    dense = sigmoid_focal_loss(x, torch.tensor([[0.0], [1.0]]), 0.25, 2.0)
    (g_dense,) = torch.autograd.grad(dense, x)
    lean = FocalLossFromLabels.apply(x, torch.tensor([-1, 0]), 0.25, 2.0, 0.0, None)
    (g_lean,) = torch.autograd.grad(lean, x)
    for grad in (g_dense, g_lean):  # dFL/dx -> alpha_t * dCE/dx = +0.75 and -0.25 as p_t -> 0
        torch.testing.assert_close(grad, torch.tensor([[0.75], [-0.25]]))
    torch.testing.assert_close(dense, torch.tensor(50.0 * 0.75 + 50.0 * 0.25))
    torch.testing.assert_close(lean, dense)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32(dtype):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(32, 4, generator=g) * 4).to(dtype)
    t = (torch.rand(32, 4, generator=g) < 0.3).to(dtype)
    got = sigmoid_focal_loss(x, t, 0.25, 2.0, "none")
    assert got.dtype == torch.float32
    assert torch.equal(got, sigmoid_focal_loss(x.float(), t.float(), 0.25, 2.0, "none"))
    xl = x.clone().requires_grad_()
    labels = torch.where(t.bool().any(1), t.argmax(1), -1)
    lean = FocalLossFromLabels.apply(xl, labels, 0.25, 2.0, 0.0, None)
    lean.backward()
    assert lean.dtype == torch.float32 and xl.grad.dtype == dtype and torch.isfinite(xl.grad.float()).all()


def test_per_class_alpha_weights_the_right_class():
    x = torch.tensor([[0.3, -1.0, 0.7], [2.0, 0.1, -0.4]])
    t = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])  # only class 2 of row 0 is positive
    alpha = torch.tensor([0.1, 0.4, 0.8])
    plain = sigmoid_focal_loss(x, t, None, 2.0, "none")
    got = sigmoid_focal_loss(x, t, alpha, 2.0, "none")
    weights = torch.tensor([[0.9, 0.6, 0.8], [0.9, 0.6, 0.2]])  # alpha_k for the positive, 1 - alpha_k otherwise
    torch.testing.assert_close(got, plain * weights)
    other = sigmoid_focal_loss(x, t, torch.tensor([0.3, 0.2, 0.8]), 2.0, "none")
    assert other[0, 2] == got[0, 2] and (other[:, :2] != got[:, :2]).all()
    with pytest.raises(ValueError, match="one value per class"):
        sigmoid_focal_loss(x, t, torch.tensor([0.25, 0.25]))


def random_labels(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g, dtype=torch.float64) * 4
    labels = torch.randint(-2, k, (n,), generator=g)  # class, BACKGROUND or IGNORE
    return x, labels


@pytest.mark.parametrize("alpha,gamma,eps,weighted", [
    (0.25, 2.0, 0.0, False), (None, 2.0, 0.0, True), (0.25, 0.0, 0.0, False), (0.6, 0.5, 0.0, True),
    ("per_class", 2.0, 0.0, False), (0.25, 2.0, 0.1, True), ("per_class", 1.5, 0.2, False),
])
def test_lean_matches_dense_values_and_gradients(alpha, gamma, eps, weighted):
    x64, labels = random_labels(300, 6, seed=3)
    if alpha == "per_class":
        alpha = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9, 0.3])
    row_weight = torch.rand(300, generator=torch.Generator().manual_seed(4)) if weighted else None
    keep = labels >= -1
    targets = F.one_hot(labels.clamp(min=0), 6).float() * (labels >= 0)[:, None]
    targets = targets * (1 - eps) + 0.5 * eps
    x = x64.float().requires_grad_()
    lean = FocalLossFromLabels.apply(x, labels, alpha, gamma, eps, row_weight)
    (g_lean,) = torch.autograd.grad(lean, x)
    per_row = sigmoid_focal_loss(x, targets, alpha, gamma, "none").sum(1) * keep
    dense = (per_row * (row_weight if weighted else 1.0)).sum()
    (g_dense,) = torch.autograd.grad(dense, x)
    torch.testing.assert_close(lean, dense, rtol=1e-5, atol=0)
    torch.testing.assert_close(g_lean, g_dense, rtol=1e-5, atol=1e-7)
    assert (g_lean[~keep] == 0).all()
    if alpha is not None and not torch.is_tensor(alpha) and eps == 0 and not weighted:
        tv = torchvision.ops.sigmoid_focal_loss(x[keep], targets[keep], alpha, gamma, reduction="sum")
        (g_tv,) = torch.autograd.grad(tv, x)
        torch.testing.assert_close(lean, tv, rtol=1e-5, atol=0)
        torch.testing.assert_close(g_lean, g_tv, rtol=1e-5, atol=1e-7)


def test_lean_gradient_passes_gradcheck_in_float64():
    x, labels = random_labels(12, 3, seed=5)
    x.requires_grad_()
    alpha = torch.tensor([0.2, 0.5, 0.7], dtype=torch.float64)
    w = torch.rand(12, dtype=torch.float64)
    for args in ((0.25, 2.0, 0.0, None), (alpha, 1.5, 0.1, w), (None, 0.0, 0.0, w)):
        assert torch.autograd.gradcheck(lambda v, a=args: FocalLossFromLabels.apply(v, labels, *a), (x,))


# ---- RetinaNetLoss -------------------------------------------------------------------------------

K = 4


def scene():
    """3 images on 128 x 128 (image 1 has no boxes), 3024 anchors, random head outputs."""
    anchors = AnchorGenerator(sizes=(16, 32, 64), strides=(8, 16, 32), offset=0.5)([(16, 16), (8, 8), (4, 4)],
                                                                                 (128, 128))
    gt_boxes = torch.zeros(3, 2, 4)
    gt_labels = torch.full((3, 2), -1)
    gt_boxes[0] = torch.tensor([[10.0, 10.0, 50.0, 40.0], [70.0, 60.0, 120.0, 120.0]])
    gt_labels[0] = torch.tensor([1, 3])
    gt_boxes[2, 0] = torch.tensor([20.0, 70.0, 60.0, 110.0])
    gt_labels[2, 0] = 0
    g = torch.Generator().manual_seed(6)
    cls_logits = (torch.randn(3, len(anchors), K, generator=g) * 2 - 3).requires_grad_()
    box_deltas = (torch.randn(3, len(anchors), 4, generator=g) * 0.3).requires_grad_()
    return cls_logits, box_deltas, anchors, gt_boxes, gt_labels


def test_batch_normalisation_equals_dense_formula_with_empty_image_and_crowd():
    cls_logits, box_deltas, anchors, gt_boxes, gt_labels = scene()
    gt_boxes[1, 0], gt_labels[1, 0] = torch.tensor([0.0, 0.0, 64.0, 64.0]), 2  # image 1: only a crowd box
    crowd = torch.zeros(3, 2, dtype=torch.bool)
    crowd[1, 0] = True
    out = RetinaNetLoss(K, beta=0.1)(cls_logits, box_deltas, anchors, gt_boxes, gt_labels, crowd)
    matched = Matcher()(anchors, gt_boxes, gt_labels >= 0, crowd)
    fg, valid = matched >= 0, matched != IGNORE
    assert (matched[1] == IGNORE).any() and not fg[1].any()
    assert out["num_pos"] == fg.sum() and fg.sum() > 10
    target = torch.zeros_like(cls_logits)
    b, a = fg.nonzero(as_tuple=True)
    target[b, a, gt_labels[b, matched[b, a]]] = 1.0
    dense_cls = sigmoid_focal_loss(cls_logits[valid], target[valid], 0.25, 2.0) / fg.sum()
    deltas = BoxCoder().encode(anchors[a], gt_boxes[b, matched[b, a]])
    dense_box = F.smooth_l1_loss(box_deltas[b, a], deltas, beta=0.1, reduction="sum") / fg.sum()
    torch.testing.assert_close(out["loss_cls"], dense_cls, rtol=1e-5, atol=0)
    torch.testing.assert_close(out["loss_box"], dense_box, rtol=1e-5, atol=0)
    torch.testing.assert_close(out["loss"], dense_cls + dense_box)
    out["loss"].backward()
    assert torch.isfinite(cls_logits.grad).all() and (box_deltas.grad[1] == 0).all()


def test_image_without_boxes_adds_no_box_loss_and_a_given_normalizer_is_used():
    cls_logits, box_deltas, anchors, gt_boxes, gt_labels = scene()
    loss = RetinaNetLoss(K)
    full = loss(cls_logits, box_deltas, anchors, gt_boxes, gt_labels)
    pair = [0, 2]
    without = loss(cls_logits[pair], box_deltas[pair], anchors, gt_boxes[pair], gt_labels[pair])
    assert torch.isfinite(full["loss"]) and full["num_pos"] == without["num_pos"]
    torch.testing.assert_close(full["loss_box"], without["loss_box"])
    assert full["loss_cls"] > without["loss_cls"]  # the empty image's negatives still count
    # the positives of a larger batch (every micro-batch of a step, every rank), matched beforehand
    targets = loss.assign(anchors, gt_boxes, gt_labels)
    larger = loss(cls_logits, box_deltas, anchors, gt_boxes, gt_labels, targets=targets,
                  normalizer=full["num_pos"] * 4)
    torch.testing.assert_close(larger["loss"], full["loss"] / 4)
    no_gt = loss(cls_logits, box_deltas, anchors, torch.zeros(3, 0, 4), torch.zeros(3, 0, dtype=torch.long))
    assert no_gt["num_pos"] == 0 and no_gt["loss_box"] == 0 and torch.isfinite(no_gt["loss_cls"])


def test_torchvision_normalisation_equals_retinanet_head_compute_loss():
    cls_logits, box_deltas, anchors, gt_boxes, gt_labels = scene()
    ours = RetinaNetLoss(K, box_loss="l1", normalization="torchvision")(
        cls_logits, box_deltas, anchors, gt_boxes, gt_labels)
    g_ours = torch.autograd.grad(ours["loss"], (cls_logits, box_deltas))

    head = RetinaNetHead(in_channels=8, num_anchors=9, num_classes=K)
    assert head.regression_head._loss_type == "l1"
    targets, matched = [], []
    tv_matcher = TvMatcher(0.5, 0.4, allow_low_quality_matches=True)
    for i in range(3):
        keep = gt_labels[i] >= 0
        targets.append({"boxes": gt_boxes[i][keep], "labels": gt_labels[i][keep]})
        matched.append(tv_matcher(box_iou(targets[i]["boxes"], anchors)) if keep.any()
                       else torch.full((len(anchors),), -1))  # as RetinaNet.compute_loss does
    tv = head.compute_loss(targets, {"cls_logits": cls_logits, "bbox_regression": box_deltas}, [anchors] * 3, matched)
    g_tv = torch.autograd.grad(tv["classification"] + tv["bbox_regression"], (cls_logits, box_deltas))
    torch.testing.assert_close(ours["loss_cls"], tv["classification"], rtol=1e-5, atol=0)
    torch.testing.assert_close(ours["loss_box"], tv["bbox_regression"], rtol=1e-5, atol=0)
    for a, b in zip(g_ours, g_tv):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_box_loss_variants():
    cls_logits, box_deltas, anchors, gt_boxes, gt_labels = scene()
    args = (cls_logits, box_deltas, anchors, gt_boxes, gt_labels)
    l1 = RetinaNetLoss(K, box_loss="l1")(*args)["loss_box"]
    beta0 = RetinaNetLoss(K, box_loss="smooth_l1", beta=0.0)(*args)["loss_box"]
    torch.testing.assert_close(beta0, l1)
    (grad,) = torch.autograd.grad(beta0, box_deltas)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    out = RetinaNetLoss(K, box_loss="giou")(*args)
    matched = Matcher()(anchors, gt_boxes, gt_labels >= 0)
    b, a = (matched >= 0).nonzero(as_tuple=True)
    pred = BoxCoder().decode(box_deltas[b, a], anchors[a])
    expected = generalized_box_iou_loss(pred, gt_boxes[b, matched[b, a]], reduction="sum") / len(b)
    torch.testing.assert_close(out["loss_box"], expected)


def test_config_style_arguments_and_errors():
    cls_logits, box_deltas, anchors, gt_boxes, gt_labels = scene()
    args = (cls_logits, box_deltas, anchors, gt_boxes, gt_labels)
    listed = RetinaNetLoss(K, alpha=[0.25] * K)(*args)  # a per-class list as Hydra passes it
    torch.testing.assert_close(listed["loss"], RetinaNetLoss(K, alpha=0.25)(*args)["loss"])
    with pytest.raises(ValueError, match="one value per class"):
        RetinaNetLoss(K, alpha=[0.25, 0.5])
    with pytest.raises(ValueError, match="normalization"):
        RetinaNetLoss(K, normalization="image")
    with pytest.raises(ValueError, match="out of range"):
        RetinaNetLoss(2)(cls_logits[..., :2], box_deltas, anchors, gt_boxes, gt_labels)


def test_alpha_from_counts():
    torch.testing.assert_close(alpha_from_counts([50, 50, 50]), torch.full((3,), 0.25))
    alpha = alpha_from_counts([10, 1000])
    assert alpha[0] > 0.25 > alpha[1] and ((alpha > 0) & (alpha < 1)).all()
