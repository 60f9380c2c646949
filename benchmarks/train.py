"""Case "train": forward + backward + optimizer step of the whole model, ours vs torchvision.

Both models have the architecture of one of our presets and the same weights; both use the same
torch optimizer (SGD with momentum for the paper preset, AdamW for the CPU preset, the presets'
settings), so only the model, loss and data layout differ. Ours
runs as ``engine.TrainStep`` does in training, ``channels_last`` as in ``trainer=default``, and
contiguous (NCHW) as a second contender to show what the layout is worth. torchvision gets the
same images as floats in [0, 1] (its input), its ``model(images, targets)`` returns the losses.

With ``conv_peak`` a third contender runs a large 3x3 convolution (256 -> 256 channels, forward)
in the same rounds: the measured peak FLOP/s of this machine for ``flops`` (item 6).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from hydra.utils import instantiate
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.models import build_pair, config, make_batch, targets_of
from benchmarks.tv import to_float_list
from retinanet.engine import TrainStep


@dataclass
class State:
    step_ours: object
    step_ours_nchw: object | None
    step_tv: object
    conv: object | None
    conv_flops: float
    arch: dict


def _conv_peak(batch: int = 2, size: int = 64, channels: int = 256):
    """A large 3x3 convolution, forward only, in its faster memory layout: ``(fn, flops)``."""
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1).eval()
    x = torch.randn(batch, channels, size, size)
    flops = 2.0 * batch * channels * channels * 9 * size * size
    variants = [(conv, x), (copy.deepcopy(conv).to(memory_format=torch.channels_last),
                            x.contiguous(memory_format=torch.channels_last))]
    best, best_t = variants[0], float("inf")
    with torch.no_grad():
        for module, inp in variants:
            module(inp)
            t0 = time.perf_counter()
            module(inp)
            if time.perf_counter() - t0 < best_t:
                best, best_t = (module, inp), time.perf_counter() - t0

    def run():
        with torch.no_grad():
            return best[0](best[1])

    return run, flops


OPTIMIZERS = {"sgd": lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4),
              "adamw": lambda params: torch.optim.AdamW(params, lr=0.002, weight_decay=0.05)}


def _optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    return OPTIMIZERS[name]([p for p in model.parameters() if p.requires_grad])


def _ours_step(model, anchors, criterion, optim: str, batch, channels_last: bool):
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = _optimizer(optim, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    train_step = TrainStep(model, criterion, anchors, optimizer, scheduler, torch.device("cpu"),
                           channels_last=channels_last)  # what the trainer runs for every step
    model.train()

    def step():
        return train_step([batch], step=0, epoch=1).terms["loss"]

    return step


def setup(preset: str = "retinanet_r50", batch: int = 2, height: int = 320, width: int = 320, num_classes: int = 80,
          boxes_per_image: int = 5, optim: str = "sgd", nchw: bool = True, conv_peak: bool = False,
          seed: int = 0) -> State:
    ours, theirs, anchors, arch = build_pair(preset, num_classes, (height, width), seed)
    data = make_batch(batch, height, width, num_classes, boxes_per_image, seed)
    criterion = instantiate(config("loss", "focal"), num_classes=num_classes)
    step_nchw = _ours_step(copy.deepcopy(ours), anchors, criterion, optim, data, False) if nchw else None
    step_ours = _ours_step(ours, anchors, criterion, optim, data, True)
    tv_images, tv_targets = to_float_list(data.images), targets_of(data)
    tv_optimizer = _optimizer(optim, theirs)
    theirs.train()

    def step_tv():
        losses = theirs(tv_images, tv_targets)
        loss = sum(losses.values())
        tv_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        tv_optimizer.step()
        return float(loss.detach())

    conv, conv_flops = _conv_peak() if conv_peak else (None, 0.0)
    return State(step_ours, step_nchw, step_tv, conv, conv_flops, arch)


def contenders(s: State) -> dict:
    fns = {"ours": s.step_ours, "torchvision": s.step_tv}
    if s.step_ours_nchw is not None:
        fns["ours_nchw"] = s.step_ours_nchw
    if s.conv is not None:
        fns["conv3x3_peak"] = s.conv
    return fns


def train_flops(s: State) -> float:
    """FLOPs of one of our train steps (forward + backward, ``torch.utils.flop_counter``)."""
    with FlopCounterMode(display=False) as counter:
        s.step_ours()
    return float(counter.get_total_flops())


def agreement(s: State) -> dict:
    """Same architecture (parameter counts) and finite losses on both sides."""
    loss_ours, loss_tv = s.step_ours(), s.step_tv()
    return {**s.arch, "loss_ours_finite": bool(torch.isfinite(torch.tensor(loss_ours))),
            "loss_torchvision_finite": bool(torch.isfinite(torch.tensor(loss_tv)))}
