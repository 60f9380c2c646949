"""Optimiser and per-iteration learning-rate schedule (linear warmup, then multistep or cosine)."""

from __future__ import annotations

import math

import torch
from torch import nn

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("multistep", "cosine", "constant")


def param_groups(model: nn.Module, weight_decay: float, norm_bias_decay: bool) -> list[dict]:
    """Trainable parameters, with weight decay off for norm weights and biases unless asked."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if norm_bias_decay or p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, name: str = "sgd", lr: float = 0.01, momentum: float = 0.9,
                    weight_decay: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999),
                    norm_bias_decay: bool = False) -> torch.optim.Optimizer:
    if lr <= 0:
        raise ValueError(f"optim.lr={lr} must be > 0")
    groups = param_groups(model, weight_decay, norm_bias_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))
    raise ValueError(f"optim.name={name!r} is not one of {OPTIMIZERS}")


def lr_factor(step: int, total_steps: int, kind: str, warmup_steps: int, warmup_factor: float,
              milestones: tuple[float, ...], gamma: float, min_factor: float) -> float:
    """Multiplier of the base learning rate at iteration ``step`` (0-based)."""
    if step < warmup_steps:
        alpha = step / max(1, warmup_steps)
        warm = warmup_factor * (1 - alpha) + alpha
    else:
        warm = 1.0
    if kind == "constant":
        return warm
    if kind == "multistep":
        passed = sum(step >= m * total_steps for m in milestones)
        return warm * gamma**passed
    if kind == "cosine":
        t = min(1.0, max(0, step - warmup_steps) / max(1, total_steps - 1 - warmup_steps))
        return warm * (min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * t)))
    raise ValueError(f"schedule.name={kind!r} is not one of {SCHEDULES}")


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, name: str = "multistep",
                    warmup_steps: int = 500, warmup_factor: float = 0.001,
                    milestones: tuple[float, ...] = (0.667, 0.889), gamma: float = 0.1,
                    min_factor: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration schedule. ``milestones`` are fractions of the total number of steps, which
    ``set_total_steps`` may change later (a run shortened by ``trainer.time_limit``)."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule.name={name!r} is not one of {SCHEDULES}")
    milestones = tuple(milestones)
    if any(not 0 < m < 1 for m in milestones):
        raise ValueError(f"schedule.milestones={list(milestones)} must be fractions of training in (0, 1)")
    # a plain function (not a callable object): LambdaLR then keeps the plan out of its state_dict,
    # so a resumed run follows its own config, not the one saved in the checkpoint
    plan = {"total_steps": int(total_steps)}

    def factor(step: int) -> float:
        total = plan["total_steps"]
        return lr_factor(step, total, name, min(warmup_steps, max(0, total - 1)), warmup_factor, milestones, gamma,
                         min_factor)

    factor.plan = plan
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def set_total_steps(scheduler: torch.optim.lr_scheduler.LambdaLR, total_steps: int) -> None:
    """Re-plan a ``build_scheduler`` schedule for ``total_steps``; the current learning rate follows at once."""
    for fn in scheduler.lr_lambdas:
        fn.plan["total_steps"] = int(total_steps)
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
