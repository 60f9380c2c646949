"""Every fast path against the straightforward formulation it replaces, on random inputs (values and gradients).

- ``Matcher``: chunked IoU with a sparse low-quality pass vs the dense ``[B, M, A]`` IoU matrix.
- ``FocalLossFromLabels``: chunked loss and analytic gradient vs the dense focal loss on one-hot targets
  through autograd.
- ``RetinaNetLoss``: vs a per-image loop over dense targets (both normalisations).
- ``PostProcessor``: batched top-k vs torchvision's per-image ``postprocess_detections``.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.retinanet import RetinaNet as TvRetinaNet
from torchvision.ops import box_iou

import retinanet.losses as losses_module
from retinanet.anchors import AnchorGenerator
from retinanet.boxes import BoxCoder
from retinanet.losses import FocalLossFromLabels, RetinaNetLoss, sigmoid_focal_loss
from retinanet.matcher import BACKGROUND, IGNORE, Matcher
from retinanet.postprocess import PostProcessor


@pytest.fixture(autouse=True)
def one_thread():
    """Single-threaded: these tests run many tiny ops, and on a shared machine every multi-threaded
    op can wait a scheduler time slice for its second thread (the results do not depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dense_match(anchors, gt_boxes, gt_valid, gt_crowd=None, fg_iou=0.5, bg_iou=0.4, low_quality=True, crowd_ioa=0.5):
    """The matcher written out on the whole IoU matrix ``[B, M, A]``."""
    batch, num_gt = gt_boxes.shape[:2]
    matched = torch.full((batch, len(anchors)), BACKGROUND, dtype=torch.int64)
    if num_gt == 0:
        return matched
    crowd = gt_valid & gt_crowd if gt_crowd is not None else torch.zeros_like(gt_valid)
    iou = torch.stack([box_iou(g, anchors) for g in gt_boxes])  # [B, M, A]
    iou = iou.masked_fill(~(gt_valid & ~crowd)[..., None], -1.0)
    best_iou, best_gt = iou.max(dim=1)
    matched = torch.where(best_iou >= fg_iou, best_gt, matched)
    matched = torch.where((best_iou >= bg_iou) & (best_iou < fg_iou), IGNORE, matched)
    if low_quality:
        gt_best = iou.amax(dim=2, keepdim=True)
        is_best = (iou == gt_best) & (gt_best > 0)
        lq_iou, lq_gt = iou.masked_fill(~is_best, -1.0).max(dim=1)
        matched = torch.where(lq_iou > 0, lq_gt, matched)
    if crowd.any():
        area = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
        lt = torch.maximum(gt_boxes[..., None, :2], anchors[:, :2])
        rb = torch.minimum(gt_boxes[..., None, 2:], anchors[:, 2:])
        inter = (rb - lt).clamp(min=0).prod(-1)  # [B, M, A]
        covered = (inter / area).masked_fill(~crowd[..., None], 0.0).amax(dim=1) >= crowd_ioa
        matched = torch.where((matched == BACKGROUND) & covered, IGNORE, matched)
    return matched


def random_gt(gen, batch, num_gt, size, overlap=True):
    """Random boxes (overlapping, some duplicated so ties happen), padding rows and crowd flags."""
    xy = torch.rand(batch, num_gt, 2, generator=gen) * size * 0.8
    wh = 4 + torch.rand(batch, num_gt, 2, generator=gen) * size * 0.4
    boxes = torch.cat([xy, xy + wh], -1)
    boxes[:, -1] = boxes[:, 0]  # a duplicate gt: equal IoU everywhere, ties to the lower index
    valid = torch.rand(batch, num_gt, generator=gen) > 0.2
    valid[-1] = False  # the last image is all padding
    crowd = torch.rand(batch, num_gt, generator=gen) < 0.15
    return boxes, valid, crowd


@pytest.mark.parametrize("chunk", [400, 2**18])
@pytest.mark.parametrize("low_quality", [True, False])
def test_chunked_matcher_equals_dense(chunk, low_quality):
    gen = torch.Generator().manual_seed(chunk)
    anchors = AnchorGenerator(sizes=(8, 16, 32), strides=(8, 16, 32), offset=0.5)([(12, 12), (6, 6), (3, 3)], (96, 96))
    anchors = torch.cat([anchors, anchors[:5]])  # duplicated anchors: a gt's best IoU reached twice
    for trial in range(2):
        boxes, valid, crowd = random_gt(gen, 3, 9, 96)
        for c in (None, crowd):
            for fg, bg in ((0.5, 0.4), (0.3, 0.3)):
                got = Matcher(fg, bg, low_quality, chunk_elements=chunk)(anchors, boxes, valid, c)
                expected = dense_match(anchors, boxes, valid, c, fg, bg, low_quality)
                assert torch.equal(got, expected), (trial, c is not None, fg)
    assert (expected >= 0).any() and (expected == IGNORE).any()


def test_chunked_matcher_equals_dense_on_coco_like_scene():
    gen = torch.Generator().manual_seed(1)
    gen_anchors = AnchorGenerator(sizes=(32, 64, 128), strides=(8, 16, 32), offset=0.0, round_cell_anchors=True)
    anchors = gen_anchors([(40, 60), (20, 30), (10, 15)], (320, 480))
    boxes, valid, crowd = random_gt(gen, 2, 20, 320)
    got = Matcher(chunk_elements=4096)(anchors, boxes, valid, crowd)
    assert torch.equal(got, dense_match(anchors, boxes, valid, crowd))


def dense_focal(x, labels, alpha, gamma, eps, row_weight):
    """Focal loss on a dense one-hot target, summed over non-ignored rows, differentiated by autograd."""
    k = x.shape[1]
    target = F.one_hot(labels.clamp(min=0), k).to(x.dtype) * (labels >= 0)[:, None]
    target = target * (1 - eps) + 0.5 * eps
    per_row = sigmoid_focal_loss(x, target, alpha, gamma, reduction="none").sum(1) * (labels >= BACKGROUND)
    return (per_row * (1.0 if row_weight is None else row_weight)).sum()


@pytest.mark.parametrize("alpha,gamma,eps,weighted", [
    (0.25, 2.0, 0.0, False), (0.25, 2.0, 0.0, True), (None, 0.0, 0.0, False), (0.4, 1.5, 0.0, True),
    ("per_class", 2.0, 0.0, False), (0.25, 2.0, 0.1, True),
])
def test_chunked_focal_equals_dense_values_and_gradients(monkeypatch, alpha, gamma, eps, weighted):
    monkeypatch.setattr(losses_module, "chunk_elements", lambda device: 70)  # 10 rows of 7 classes a chunk: many chunks
    gen = torch.Generator().manual_seed(2)
    n, k = 203, 7
    x = (torch.randn(n, k, generator=gen) * 4).requires_grad_()
    labels = torch.randint(-2, k, (n,), generator=gen)
    labels[[0, 9, 10, 19, 20, 202]] = torch.tensor([3, 0, 6, 2, 1, 5])  # foreground at chunk edges
    if alpha == "per_class":
        alpha = torch.rand(k, generator=gen)
    w = torch.rand(n, generator=gen) if weighted else None
    lean = FocalLossFromLabels.apply(x, labels, alpha, gamma, eps, w)
    (g_lean,) = torch.autograd.grad(lean * 3.0, x)  # a grad_out other than 1
    x64 = x.detach().double().requires_grad_()  # float64 reference: float32 autograd cancels in s - t
    dense = dense_focal(x64, labels, alpha.double() if torch.is_tensor(alpha) else alpha, gamma, eps,
                        None if w is None else w.double())
    (g_dense,) = torch.autograd.grad(dense * 3.0, x64)
    torch.testing.assert_close(lean.double(), dense, rtol=1e-5, atol=0)
    torch.testing.assert_close(g_lean.double(), g_dense, rtol=1e-5, atol=1e-7)
    assert (g_lean[labels == IGNORE] == 0).all()


def test_focal_without_grad_and_with_retained_graph():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(50, 4, generator=gen).requires_grad_()
    labels = torch.randint(-2, 4, (50,), generator=gen)
    with torch.no_grad():
        value = FocalLossFromLabels.apply(x, labels, 0.25, 2.0, 0.0, None)
    loss = FocalLossFromLabels.apply(x, labels, 0.25, 2.0, 0.0, None)
    torch.testing.assert_close(value, loss.detach())
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x)
    assert torch.equal(g1, g2)


def reference_retinanet_loss(cls_logits, box_deltas, anchors, gt_boxes, gt_labels, normalization, beta):
    """A per-image loop over dense one-hot targets (what the batched loss replaces)."""
    coder = BoxCoder()
    cls_terms, box_terms, counts = [], [], []
    for i in range(len(cls_logits)):
        valid = gt_labels[i] >= 0
        matched = dense_match(anchors, gt_boxes[i:i + 1], valid[None])[0]
        fg = matched >= 0
        target = torch.zeros_like(cls_logits[i])
        target[fg, gt_labels[i][matched[fg]]] = 1.0
        keep = matched != IGNORE
        cls_terms.append(sigmoid_focal_loss(cls_logits[i][keep], target[keep], 0.25, 2.0))
        deltas = coder.encode(anchors[fg], gt_boxes[i][matched[fg]])
        box_terms.append(F.smooth_l1_loss(box_deltas[i][fg], deltas, beta=beta, reduction="sum"))
        counts.append(fg.sum())
    counts = torch.stack(counts).float()
    if normalization == "batch":
        norm = counts.sum().clamp(min=1)
        return sum(cls_terms) / norm, sum(box_terms) / norm
    per = counts.clamp(min=1)
    return (sum(c / n for c, n in zip(cls_terms, per)) / len(per),
            sum(b / n for b, n in zip(box_terms, per)) / len(per))


@pytest.mark.parametrize("normalization", ["batch", "torchvision"])
def test_retinanet_loss_equals_per_image_reference(monkeypatch, normalization):
    monkeypatch.setattr(losses_module, "chunk_elements", lambda device: 512)
    gen = torch.Generator().manual_seed(4)
    k = 5
    anchors = AnchorGenerator(sizes=(16, 32, 64), strides=(8, 16, 32), offset=0.5)([(16, 16), (8, 8), (4, 4)],
                                                                                 (128, 128))
    boxes, valid, _ = random_gt(gen, 3, 6, 128)
    labels = torch.where(valid, torch.randint(0, k, (3, 6), generator=gen), -1)
    cls_logits = (torch.randn(3, len(anchors), k, generator=gen) * 2 - 2).requires_grad_()
    box_deltas = (torch.randn(3, len(anchors), 4, generator=gen) * 0.3).requires_grad_()
    out = RetinaNetLoss(k, beta=0.11, normalization=normalization, matcher=Matcher(chunk_elements=1000))(
        cls_logits, box_deltas, anchors, boxes, labels)
    ref_cls, ref_box = reference_retinanet_loss(cls_logits, box_deltas, anchors, boxes, labels, normalization, 0.11)
    torch.testing.assert_close(out["loss_cls"], ref_cls, rtol=1e-5, atol=0)
    torch.testing.assert_close(out["loss_box"], ref_box, rtol=1e-5, atol=0)
    grads = torch.autograd.grad(out["loss"], (cls_logits, box_deltas))
    ref_grads = torch.autograd.grad(ref_cls + ref_box, (cls_logits, box_deltas))
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)


class _Backbone(nn.Module):
    out_channels = 8


def test_batched_postprocess_equals_torchvision_per_image_on_many_candidates():
    k, shapes, image = 6, [(20, 24), (10, 12), (5, 6)], (160, 192)
    gen_anchors = AnchorGenerator(sizes=(16, 32, 64), strides=(8, 16, 32), round_cell_anchors=True,
                                  strides_from_image=True)
    anchors = gen_anchors(shapes, image)
    per_level = gen_anchors.num_anchors_per_level(shapes)
    g = torch.Generator().manual_seed(5)
    cls_logits = torch.randn(3, len(anchors), k, generator=g) - 1  # most scores above 0.05
    box_deltas = torch.randn(3, len(anchors), 4, generator=g) * 0.2
    sizes = [(160, 192), (150, 170), (160, 100)]
    settings = {"score_thresh": 0.05, "topk_candidates": 500, "nms_thresh": 0.5, "detections_per_img": 80}
    ours = PostProcessor(**settings)(cls_logits, box_deltas, anchors, per_level, torch.tensor(sizes))
    tv = TvRetinaNet(_Backbone(), num_classes=k, **settings)
    head = {"cls_logits": list(cls_logits.split(per_level, dim=1)),
            "bbox_regression": list(box_deltas.split(per_level, dim=1))}
    expected = tv.postprocess_detections(head, [list(anchors.split(per_level))] * 3, sizes)
    for got, exp in zip(ours, expected):
        assert len(got["scores"]) == len(exp["scores"]) == 80
        a, b = got["scores"].argsort(descending=True), exp["scores"].argsort(descending=True)
        torch.testing.assert_close(got["scores"][a], exp["scores"][b], rtol=0, atol=1e-6)
        torch.testing.assert_close(got["boxes"][a], exp["boxes"][b], rtol=0, atol=1e-4)
        assert torch.equal(got["labels"][a], exp["labels"][b])
