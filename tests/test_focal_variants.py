"""Focal-loss options as users set them in the config (alpha scalar / off / per class / auto, gamma,
label smoothing), end to end through Hydra, against a float64 formula; and the Figure 1 plot script."""

import importlib.util
import re

import pytest
import torch
import torch.nn.functional as F

from retinanet.anchors import AnchorGenerator
from retinanet.config import CONFIGS, validate_train_config
from retinanet.config import build as build_node
from retinanet.errors import ConfigError
from retinanet.losses import alpha_from_counts
from retinanet.matcher import IGNORE, Matcher

from conftest import ROOT, compose_train

K = 3


def scene(label0=0):
    """2 images of 128 x 128 (image 1 has no boxes), 3024 anchors, random logits; image 0 holds two boxes."""
    anchors = AnchorGenerator(sizes=(16, 32, 64), strides=(8, 16, 32), offset=0.5)([(16, 16), (8, 8), (4, 4)],
                                                                                 (128, 128))
    gt_boxes = torch.zeros(2, 2, 4)
    gt_boxes[0] = torch.tensor([[10.0, 10.0, 50.0, 40.0], [70.0, 60.0, 120.0, 120.0]])
    gt_labels = torch.tensor([[label0, 2], [-1, -1]])
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, len(anchors), K, generator=g) * 3 - 2
    deltas = torch.randn(2, len(anchors), 4, generator=g) * 0.2
    return logits, deltas, anchors, gt_boxes, gt_labels


def reference_cls_loss(logits, anchors, gt_boxes, gt_labels, alpha, gamma, eps=0.0):
    """Float64 ``sum -alpha_t (1 - p_t)^gamma log(p_t)`` over non-ignored anchors / positives, written out."""
    matched = Matcher()(anchors, gt_boxes, gt_labels >= 0)
    fg, valid = matched >= 0, matched != IGNORE
    t = torch.zeros(logits.shape, dtype=torch.float64)
    b, a = fg.nonzero(as_tuple=True)
    t[b, a, gt_labels[b, matched[b, a]]] = 1.0
    t = t * (1 - eps) + eps / 2
    x = logits.double()
    p = torch.sigmoid(x)
    p_t = p * t + (1 - p) * (1 - t)
    log_p_t = t * F.logsigmoid(x) + (1 - t) * F.logsigmoid(-x)  # = log(p_t) for hard targets, -CE for soft ones
    a_t = 1.0 if alpha is None else torch.as_tensor(alpha, dtype=torch.float64) * t + (
        1 - torch.as_tensor(alpha, dtype=torch.float64)) * (1 - t)
    loss = -a_t * (1 - p_t) ** gamma * log_p_t
    return (loss * valid[..., None]).sum() / fg.sum(), fg.sum()


def build(overrides, train_counts=None):
    """The loss as ``scripts/train.py`` builds it (validated config, the training set's class counts for
    ``alpha=auto``), from ``loss=focal``: the paper's defaults and ``Matcher()``'s thresholds, as
    ``reference_cls_loss`` uses."""
    cfg = compose_train(["loss=focal", *overrides])
    validate_train_config(cfg)
    return build_node(cfg.loss, num_classes=K, class_counts=train_counts)


@pytest.mark.parametrize("overrides, alpha, gamma, eps", [
    ([], 0.25, 2.0, 0.0),
    (["loss.alpha=null"], None, 2.0, 0.0),
    (["loss.alpha=[0.9,0.1,0.5]"], [0.9, 0.1, 0.5], 2.0, 0.0),
    (["loss.gamma=5", "loss.alpha=0.1"], 0.1, 5.0, 0.0),
    (["loss.gamma=0.5", "loss.alpha=0.75"], 0.75, 0.5, 0.0),
    (["loss.label_smoothing=0.1"], 0.25, 2.0, 0.1),
    (["loss.alpha=[0.2,0.4,0.6]", "loss.gamma=1.5", "loss.label_smoothing=0.05"], [0.2, 0.4, 0.6], 1.5, 0.05),
])
def test_config_options_equal_the_float64_formula(overrides, alpha, gamma, eps):
    logits, deltas, anchors, gt_boxes, gt_labels = scene()
    logits.requires_grad_()
    out = build(overrides)(logits, deltas, anchors, gt_boxes, gt_labels)
    expected, num_pos = reference_cls_loss(logits.detach(), anchors, gt_boxes, gt_labels, alpha, gamma, eps)
    assert out["num_pos"] == num_pos > 5
    torch.testing.assert_close(out["loss_cls"].double(), expected, rtol=2e-6, atol=0)
    (grad,) = torch.autograd.grad(out["loss_cls"], logits)
    assert torch.isfinite(grad).all() and (grad[1] != 0).all()  # the empty image's negatives are trained too


def test_gamma0_alpha_off_from_config_is_binary_cross_entropy():
    logits, deltas, anchors, gt_boxes, gt_labels = scene()
    out = build(["loss.gamma=0", "loss.alpha=null"])(logits, deltas, anchors, gt_boxes, gt_labels)
    matched = Matcher()(anchors, gt_boxes, gt_labels >= 0)
    fg, valid = matched >= 0, matched != IGNORE
    target = torch.zeros_like(logits)
    b, a = fg.nonzero(as_tuple=True)
    target[b, a, gt_labels[b, matched[b, a]]] = 1.0
    bce = F.binary_cross_entropy_with_logits(logits[valid], target[valid], reduction="sum") / fg.sum()
    torch.testing.assert_close(out["loss_cls"], bce, rtol=1e-6, atol=0)


def test_per_class_alpha_from_config_weights_the_right_class():
    """alpha = [0.9, 0.1, 0.5]: a class-0 positive weighs 0.9, a class-1 positive 0.1; negatives of class k 1 - a_k."""
    logits, deltas, anchors, gt_boxes, gt_labels = scene()
    plain, weighted = build(["loss.alpha=null"]), build(["loss.alpha=[0.9,0.1,0.5]"])
    matched = Matcher()(anchors, gt_boxes, gt_labels >= 0)
    b, a = (matched >= 0).nonzero(as_tuple=True)
    in_box0 = (b == 0) & (matched[b, a] == 0)
    for label, alpha in ((0, 0.9), (1, 0.1)):
        gt_labels[0, 0] = label
        confident = torch.full_like(logits, -30.0)  # every element classified right with ~0 loss ...
        confident[b, a, gt_labels[b, matched[b, a]]] = 30.0
        positives = confident.clone()
        positives[b[in_box0], a[in_box0], label] = 0.0  # ... but the positives of box 0, at p = 0.5
        negatives = confident.clone()
        negatives[1, :, label] = 0.0  # ... or the negatives of class `label` in image 1 (no boxes), at p = 0.5
        for logits_case, weight in ((positives, alpha), (negatives, 1 - alpha)):
            ratio = (weighted(logits_case, deltas, anchors, gt_boxes, gt_labels)["loss_cls"]
                     / plain(logits_case, deltas, anchors, gt_boxes, gt_labels)["loss_cls"])
            torch.testing.assert_close(ratio, torch.tensor(weight), rtol=1e-5, atol=0)


def test_alpha_auto_from_training_set_counts():
    counts = [4000, 400, 40]  # class 2 is rare
    loss = build(["loss.alpha=auto"], train_counts=counts)
    alpha = loss.class_alpha
    torch.testing.assert_close(alpha, alpha_from_counts(counts))
    assert alpha[2] > alpha[1] > alpha[0] and ((alpha > 0) & (alpha < 1)).all()
    odds = alpha.double() / (1 - alpha.double())
    # inverse frequency (square root), normalised so a class of mean frequency keeps the base 0.25
    torch.testing.assert_close(odds, (1 / 3) * (torch.tensor(counts).double().mean() / torch.tensor(counts)) ** 0.5,
                               rtol=1e-6, atol=0)
    balanced = build(["loss.alpha=auto"], train_counts=[50, 50, 50]).class_alpha
    torch.testing.assert_close(balanced, torch.full((3,), 0.25))
    logits, deltas, anchors, gt_boxes, gt_labels = scene()
    expected, _ = reference_cls_loss(logits, anchors, gt_boxes, gt_labels, alpha.tolist(), 2.0)
    torch.testing.assert_close(loss(logits, deltas, anchors, gt_boxes, gt_labels)["loss_cls"].double(), expected,
                               rtol=2e-6, atol=0)


@pytest.mark.parametrize("override, message", [
    ("loss.alpha=automatic", "loss: alpha='automatic' must be a number in [0, 1], null, auto"),
    ("loss.alpha=[0.5,2.0,0.1]", "loss: alpha=[0.5, 2.0, 0.1] must hold numbers in [0, 1]"),
    ("loss.gamma=-1", "loss: gamma=-1 must be a number >= 0"),
    ("loss.label_smoothing=2", "loss: label_smoothing=2 must be a number in [0, 1)"),
])
def test_bad_options_name_key_and_value(override, message):
    with pytest.raises(ConfigError) as err:
        build([override], train_counts=[1, 1, 1])
    assert message in str(err.value)


def test_wrong_length_per_class_alpha_is_refused():
    expected = r"shape \(2,\), expected \(3,\) = one value per class"
    with pytest.raises(ConfigError, match=expected):
        build(["loss.alpha=[0.5,0.5]"])


def test_the_trainer_puts_the_loss_and_its_per_class_alpha_on_the_models_device(tiny_shapes, tmp_path):
    # a per-class alpha is a buffer of the loss; composed for the (data-less) meta device, every tensor of the run
    # must land there: a CPU buffer left behind is what crashed loss.alpha=auto on CUDA
    from omegaconf import OmegaConf

    from retinanet.trainer import compose

    from conftest import tiny_train_overrides

    cfg = compose_train(tiny_train_overrides(tiny_shapes) + ["loss.alpha=auto", "trainer.ema.decay=0.9"])
    parts = compose(cfg, OmegaConf.to_container(cfg, resolve=True), tmp_path, torch.device("meta"))
    assert parts.criterion.class_alpha is not None
    for module in (parts.model, parts.criterion, parts.ema.module):
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            assert tensor.device.type == "meta", name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_per_class_alpha_loss_runs_on_cuda():
    loss = build(["loss.alpha=auto"], train_counts=[10, 20, 30]).to("cuda")
    logits, deltas, anchors, gt_boxes, gt_labels = (t.cuda() for t in scene())
    logits.requires_grad_()
    out = loss(logits, deltas, anchors, gt_boxes, gt_labels)
    out["loss"].backward()
    assert torch.isfinite(logits.grad).all()


def test_every_focal_option_has_a_one_line_comment():
    lines = (CONFIGS / "loss/focal.yaml").read_text().splitlines()
    options = {m.group(1): line for line in lines if (m := re.match(r"(\w+):", line))}
    for key in ("alpha", "gamma", "label_smoothing"):
        assert "#" in options[key], key
    assert all(word in options["alpha"] for word in ("null", "per class", "auto"))


def test_plot_script_draws_the_formula_and_its_gradient(tmp_path):
    spec = importlib.util.spec_from_file_location("plot_focal_loss", ROOT / "scripts/plot_focal_loss.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    data = script.curves(points=99)
    p_t = data["p_t"]
    assert script.GAMMAS == (0.0, 0.5, 1.0, 2.0, 5.0) and p_t.dtype == torch.float64
    for gamma in script.GAMMAS:
        torch.testing.assert_close(data["loss"][gamma], -(1 - p_t) ** gamma * torch.log(p_t), rtol=1e-12, atol=0)
        analytic = (1 - p_t) ** gamma * ((1 - p_t) - gamma * p_t * torch.log(p_t))  # -dFL/dx, x = logit(p_t)
        torch.testing.assert_close(data["grad"][gamma], analytic, rtol=1e-10, atol=1e-15)
    out = script.main(["--out", str(tmp_path / "plots" / "focal.png")])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
