"""Exponential moving average of the weights (``trainer.ema.decay``), evaluated and checkpointed alongside.

After every optimiser step ``ema = d * ema + (1 - d) * weights`` for every floating-point parameter
and buffer (batch-norm statistics included; integer buffers are copied), with the decay ramped up
as ``d = min(decay, (1 + n) / (10 + n))`` over the first updates ``n`` (TensorFlow's
``ExponentialMovingAverage`` rule), so that short runs are not dominated by the initial weights.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma:
    """An averaged copy of ``model`` (kept in eval mode, never trained)."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"trainer.ema.decay={decay} must be in (0, 1), e.g. 0.9998")
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        ours, theirs = self.module.state_dict(), model.state_dict()
        for k, v in ours.items():
            if v.is_floating_point():
                v.lerp_(theirs[k].detach(), 1.0 - d)
            else:
                v.copy_(theirs[k])
        self.updates += 1

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.updates = int(state["updates"])
