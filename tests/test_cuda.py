"""CUDA readiness: the GPU code paths against their CPU results (run by `scripts/gpu_check.sh`).

Every test here needs a CUDA device and is skipped cleanly without one (as on the CPU machines the
suite usually runs on): the per-class alpha focal loss, the chunked matcher and focal loss with the
GPU's chunk size, a train step under 16-mixed (GradScaler) and bf16-mixed autocast, fused AdamW,
``Detector.predict`` on CUDA against CPU, and a tiny training run end to end on the GPU.
"""

import math

import numpy as np
import pytest
import torch

import retinanet.losses as losses_module
from retinanet.anchors import AnchorGenerator
from retinanet.data.collate import Batch
from retinanet.engine import TrainStep
from retinanet.losses import FocalLossFromLabels, RetinaNetLoss
from retinanet.matcher import Matcher
from retinanet.model import RetinaNet
from retinanet.optim import adamw, constant
from retinanet.runtime import chunk_elements, native_bf16, precision_setup

from conftest import compose_train, tiny_train_overrides

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def scene(num_classes: int = 5, batch: int = 3, num_gt: int = 7, size: int = 256, seed: int = 0):
    """Anchors of a 3-level pyramid, gt boxes (some padded, one crowd), random head outputs."""
    gen = torch.Generator().manual_seed(seed)
    anchors = AnchorGenerator(sizes=(32, 64, 128), strides=(8, 16, 32), offset=0.5)(
        [(size // 8,) * 2, (size // 16,) * 2, (size // 32,) * 2], (size, size))
    xy = torch.rand(batch, num_gt, 2, generator=gen) * size * 0.7
    wh = 16 + torch.rand(batch, num_gt, 2, generator=gen) * size * 0.3
    boxes = torch.cat([xy, (xy + wh).clamp(max=size)], dim=-1)
    labels = torch.randint(0, num_classes, (batch, num_gt), generator=gen)
    labels[0, -2:] = -1  # padding
    crowd = torch.zeros(batch, num_gt, dtype=torch.bool)
    crowd[1, 0] = True
    cls = torch.randn(batch, len(anchors), num_classes, generator=gen) - 2
    box = torch.randn(batch, len(anchors), 4, generator=gen) * 0.1
    return anchors, boxes, labels, crowd, cls, box


def loss_and_grads(criterion, device, anchors, boxes, labels, crowd, cls, box):
    cls = cls.to(device).requires_grad_()
    box = box.to(device).requires_grad_()
    criterion = criterion.to(device)
    out = criterion(cls, box, anchors.to(device), boxes.to(device), labels.to(device), crowd.to(device))
    out["loss"].backward()
    return {k: v.detach().cpu() for k, v in out.items()}, cls.grad.cpu(), box.grad.cpu()


@pytest.mark.parametrize("alpha", ["auto", [0.1, 0.25, 0.5, 0.75, 0.9], 0.25])
def test_per_class_alpha_focal_loss_on_cuda_equals_cpu(alpha):
    data = scene()
    make = lambda: RetinaNetLoss(5, alpha=alpha, class_counts=[100, 30, 10, 3, 1])  # noqa: E731
    cpu, g_cls_cpu, g_box_cpu = loss_and_grads(make(), torch.device("cpu"), *data)
    gpu, g_cls_gpu, g_box_gpu = loss_and_grads(make(), CUDA, *data)
    for key in ("loss", "loss_cls", "loss_box"):
        torch.testing.assert_close(gpu[key], cpu[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_cls_gpu, g_cls_cpu, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(g_box_gpu, g_box_cpu, rtol=1e-4, atol=1e-7)


def test_chunked_matcher_on_cuda_equals_cpu():
    anchors, boxes, labels, crowd, _, _ = scene(batch=4, num_gt=20, size=512, seed=1)
    valid = labels >= 0
    expected = Matcher(chunk_elements=4096)(anchors, boxes, valid, crowd)
    for chunk in (4096, None):  # small chunks (many steps) and the GPU's own size (runtime.chunk_elements)
        got = Matcher(chunk_elements=chunk)(anchors.to(CUDA), boxes.to(CUDA), valid.to(CUDA), crowd.to(CUDA))
        assert torch.equal(got.cpu(), expected), chunk
    assert chunk_elements(CUDA) > chunk_elements(torch.device("cpu"))


@pytest.mark.parametrize("chunk", [70, None])
def test_chunked_focal_loss_on_cuda_equals_cpu(monkeypatch, chunk):
    if chunk is not None:
        monkeypatch.setattr(losses_module, "chunk_elements", lambda device: chunk)  # many chunks on both devices
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(500, 7, generator=gen)
    labels = torch.randint(-2, 7, (500,), generator=gen)
    alpha = torch.linspace(0.1, 0.9, 7)
    results = []
    for device in (torch.device("cpu"), CUDA):
        xd = x.to(device).requires_grad_()
        loss = FocalLossFromLabels.apply(xd, labels.to(device), alpha.to(device), 2.0)
        loss.sum().backward()
        results.append((loss.detach().cpu(), xd.grad.cpu()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-7)


def make_step(precision: str, fused: bool = True):
    torch.manual_seed(0)
    anchors = AnchorGenerator(sizes=(32, 64, 128, 256, 512), strides=(8, 16, 32, 64, 128))
    model = RetinaNet(num_classes=3, num_anchors=anchors.num_anchors_per_location, backbone="resnet18", weights=None,
                      norm="bn", fpn_channels=64, head_width=64, head_depth=2).to(CUDA)
    criterion = RetinaNetLoss(3).to(CUDA)
    optimizer = adamw(model, lr=1e-4, fused=fused)
    scheduler = constant(optimizer, total_steps=10, warmup=0.0)
    dtype, scaler = precision_setup(precision, CUDA)
    step = TrainStep(model, criterion, anchors, optimizer, scheduler, CUDA, autocast_dtype=dtype, scaler=scaler,
                     grad_clip=10.0, channels_last=True)
    return step, model, optimizer, scaler


def batch(n: int = 2, size: int = 256, seed: int = 0) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
    boxes = torch.tensor([[[20.0, 30.0, 120.0, 140.0], [100.0, 60.0, 220.0, 200.0]]] * n)
    labels = torch.tensor([[0, 2]] * n)
    sizes = torch.tensor([[size, size]] * n)
    return Batch(images=images, gt_boxes=boxes, gt_labels=labels, gt_crowd=torch.zeros(n, 2, dtype=torch.bool),
                 image_ids=torch.arange(n), image_sizes=sizes, orig_sizes=sizes.clone(), scales=torch.ones(n, 2))


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed", "32"])
def test_train_step_under_amp_on_cuda(precision):
    if precision == "bf16-mixed" and not native_bf16(CUDA):
        pytest.skip("this GPU has no native bf16")
    step, model, optimizer, scaler = make_step(precision)
    assert (scaler is not None) == (precision == "16-mixed")
    assert optimizer.defaults.get("fused") is True
    before = [p.detach().clone() for p in model.parameters()]
    losses = []
    for i in range(4):
        result = step([batch(seed=i)], step=i, epoch=1)
        assert not result.skipped or (scaler is not None and i == 0)  # fp16: the first scale may overflow once
        losses.append(result.terms["loss"])
        assert math.isfinite(result.terms["loss"]) and math.isfinite(result.grad_norm)
    changed = sum(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert changed > len(before) // 2
    if scaler is not None:
        assert scaler.get_scale() > 0 and scaler.is_enabled()


def test_detector_predict_on_cuda_matches_cpu(tiny_run):
    from PIL import Image

    from retinanet.detector import Detector

    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((tiny_run.root / "val").iterdir())[:4]]
    cpu = Detector.from_checkpoint(tiny_run.checkpoint, device="cpu").predict(images)
    gpu = Detector.from_checkpoint(tiny_run.checkpoint, device="cuda").predict(images)
    for a, b in zip(cpu, gpu):
        assert b["boxes"].device.type == "cpu"  # predict returns CPU tensors whatever the device
        top = min(len(a["scores"]), len(b["scores"]), 20)
        # the highest-scoring detections agree (cuDNN and oneDNN sum in different orders)
        torch.testing.assert_close(b["scores"][:top], a["scores"][:top], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(b["boxes"][:top], a["boxes"][:top], rtol=1e-3, atol=0.05)


@pytest.mark.slow
def test_tiny_training_run_on_cuda_end_to_end(tiny_shapes, tmp_path):
    from retinanet.trainer import run

    overrides = tiny_train_overrides(tiny_shapes, out_epochs=2) + [
        "device=cuda", "trainer.precision=bf16-mixed" if native_bf16(CUDA) else "trainer.precision=16-mixed",
        "trainer.channels_last=true", "evaluation.plots.enabled=false"]
    ap = run(compose_train(overrides), tmp_path)
    assert math.isfinite(ap) and 0 <= ap <= 1
    assert (tmp_path / "last.pt").exists()
