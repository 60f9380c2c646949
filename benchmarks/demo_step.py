"""Case "demo": the train step of ``make train`` (the demo preset at its batch and training size), ours vs
torchvision's RetinaNet of the same architecture (the preset's own subnet depth on both sides), in fp32 and,
where the CPU computes bf16 natively (``retinanet.runtime.native_bf16``), in bf16 autocast; NCHW and
channels_last. Each of ours is timed against torchvision's in the same precision and layout, in interleaved
rounds; ours / NCHW-fp32 ours in the JSON tells what precision and layout are worth to the demo itself.

Ours runs as ``engine.TrainStep`` does in training (``trainer.precision=auto`` picks bf16 where it is native);
torchvision's ``model(images, targets)`` under ``torch.autocast`` (``benchmarks.train.tv_step``). Both use the
same torch optimizer (``benchmarks.train.OPTIMIZERS``), so only the model, loss and layout differ.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from hydra.utils import instantiate

from benchmarks.flops import scoped_criterion
from benchmarks.models import build_pair, config, make_batch
from benchmarks.train import ours_step, tv_step
from retinanet.runtime import native_bf16

LAYOUTS = {"NCHW": False, "channels_last": True}
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


@dataclass
class State:
    steps: dict         # "ours|torchvision <precision> <layout>" -> one train step
    precisions: list    # fp32, and bf16 where native
    arch: dict


def key(side: str, precision: str, layout: str) -> str:
    return f"{side} {precision} {layout}"


def setup(preset: str = "retinanet_r18_cpu", batch: int = 8, height: int = 128, width: int = 128,
          num_classes: int = 6, boxes_per_image: int = 4, optim: str = "adamw", seed: int = 0,
          bf16: bool | None = None) -> State:
    """``bf16``: time bf16 too (default: where the CPU computes it natively)."""
    ours, theirs, anchors, arch = build_pair(preset, num_classes, (height, width), seed, head_depth=None)
    data = make_batch(batch, height, width, num_classes, boxes_per_image, seed)
    criterion = scoped_criterion(instantiate(config("loss", "focal"), num_classes=num_classes))
    precisions = ["fp32"] + (["bf16"] if (native_bf16(torch.device("cpu")) if bf16 is None else bf16) else [])
    steps = {}
    for p in precisions:
        for layout, channels_last in LAYOUTS.items():
            steps[key("ours", p, layout)] = ours_step(copy.deepcopy(ours), anchors, criterion, optim, data,
                                                      channels_last, DTYPES[p])
            steps[key("torchvision", p, layout)] = tv_step(copy.deepcopy(theirs), optim, data, channels_last,
                                                           DTYPES[p])
    return State(steps, precisions, arch)


def contenders(s: State) -> dict:
    return dict(s.steps)


def agreement(s: State) -> dict:
    """Same architecture (parameter counts) and a finite loss from every contender."""
    losses = {name: float(step()) for name, step in s.steps.items()}
    return {**s.arch, "all_losses_finite": all(torch.isfinite(torch.tensor(v)).item() for v in losses.values()),
            "losses": losses}
