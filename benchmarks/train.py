"""Case "train": forward + backward + optimizer step of the whole model, ours vs torchvision.

Both models have the architecture of one of our presets and the same weights; both use the same
torch optimizer (SGD with momentum for the paper preset, AdamW for the CPU preset, at a low
learning rate: ``OPTIMIZERS``), so only the model, loss and data layout differ. Ours
runs as ``engine.TrainStep`` does in training, ``channels_last`` as in ``trainer=default``, and
contiguous (NCHW) as a second contender to show what the layout is worth. torchvision gets the
same images as floats in [0, 1] (its input), its ``model(images, targets)`` returns the losses.

``ours_step_of`` builds another of our steps on a copy of the model (bf16 autocast for item 6,
``benchmarks.flops``). The criterion runs inside a ``record_function("loss")`` scope on both sides
(torchvision's ``compute_loss``), so that the profile of item 7 can tell the loss apart.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from hydra.utils import instantiate
from torch.profiler import record_function

from benchmarks.flops import count_flops, scoped_criterion
from benchmarks.models import build_pair, config, make_batch, targets_of
from benchmarks.tv import to_float_list
from retinanet.engine import TrainStep
from retinanet.runtime import autocast


@dataclass
class State:
    step_ours: object
    step_ours_nchw: object | None
    step_tv: object
    arch: dict
    model: object = None           # our model as built (NCHW, before any step): ``ours_step_of`` copies it
    anchors: object = None
    criterion: object = None
    optim: str = "sgd"
    batch: object = None
    device: torch.device | None = None


# learning rates far below the presets': the bench trains on one batch over and over from random weights,
# where the R50 preset's SGD at 0.01 diverges to NaN within a few steps (timing does not depend on the rate)
OPTIMIZERS = {"sgd": lambda params: torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4),
              "adamw": lambda params: torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)}


def _optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    return OPTIMIZERS[name]([p for p in model.parameters() if p.requires_grad])


def ours_step(model, anchors, criterion, optim: str, batch, channels_last: bool,
               autocast_dtype: torch.dtype | None = None, device: torch.device | None = None):
    device = device or torch.device("cpu")
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = _optimizer(optim, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    train_step = TrainStep(model, criterion, anchors, optimizer, scheduler, device,
                           autocast_dtype=autocast_dtype, channels_last=channels_last)  # as the trainer runs it
    model.train()

    def step():
        return train_step([batch], step=0, epoch=1).terms["loss"]

    return step


def setup(preset: str = "retinanet_r50", batch: int = 2, height: int = 320, width: int = 320, num_classes: int = 80,
          boxes_per_image: int = 5, optim: str = "sgd", nchw: bool = True, seed: int = 0,
          device: str = "cpu") -> State:
    device = torch.device(device)
    ours, theirs, anchors, arch = build_pair(preset, num_classes, (height, width), seed)
    theirs = theirs.to(device)
    data = make_batch(batch, height, width, num_classes, boxes_per_image, seed).to(device)
    criterion = scoped_criterion(instantiate(config("loss", "focal"), num_classes=num_classes)).to(device)
    pristine = copy.deepcopy(ours)
    step_nchw = ours_step(copy.deepcopy(ours), anchors, criterion, optim, data, False, None, device) if nchw else None
    step_ours = ours_step(ours, anchors, criterion, optim, data, True, None, device)
    compute_loss = theirs.compute_loss

    def scoped_loss(*args, **kwargs):
        with record_function("loss"):
            return compute_loss(*args, **kwargs)

    theirs.compute_loss = scoped_loss
    step_tv = tv_step(theirs, optim, data)
    return State(step_ours, step_nchw, step_tv, arch, pristine, anchors, criterion, optim, data, device)


def tv_step(theirs, optim: str, batch, channels_last: bool = False, autocast_dtype: torch.dtype | None = None):
    """A torchvision train step on ``batch``: ``model(images, targets)`` (under ``torch.autocast`` to
    ``autocast_dtype``: its loss too, as autocast leaves it), backward, the optimizer of ``OPTIMIZERS``."""
    device = batch.images.device
    if channels_last:  # the weights' layout: convolutions of contiguous inputs then answer in channels_last
        theirs = theirs.to(memory_format=torch.channels_last)
    images, targets = to_float_list(batch.images), targets_of(batch)
    optimizer = _optimizer(optim, theirs)
    theirs.train()

    def step():
        with autocast(device, autocast_dtype):
            losses = theirs(images, targets)
            loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def ours_step_of(s: State, autocast_dtype: torch.dtype | None = None, channels_last: bool = True):
    """Another of our train steps on a copy of the model as built: ``autocast_dtype`` (bf16: bf16-mixed)."""
    return ours_step(copy.deepcopy(s.model), s.anchors, s.criterion, s.optim, s.batch, channels_last,
                      autocast_dtype, s.device)


def contenders(s: State) -> dict:
    fns = {"ours": s.step_ours, "torchvision": s.step_tv}
    if s.step_ours_nchw is not None:
        fns["ours_nchw"] = s.step_ours_nchw
    return fns


def train_flops(s: State) -> float:
    """FLOPs of one of our train steps (forward + backward, ``torch.utils.flop_counter``)."""
    return count_flops(s.step_ours)


def agreement(s: State) -> dict:
    """Same architecture (parameter counts) and finite losses on both sides."""
    loss_ours, loss_tv = s.step_ours(), s.step_tv()
    return {**s.arch, "loss_ours_finite": bool(torch.isfinite(torch.tensor(loss_ours))),
            "loss_torchvision_finite": bool(torch.isfinite(torch.tensor(loss_tv)))}
