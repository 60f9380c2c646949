"""Optimisers and per-iteration learning-rate schedules, one factory each (``configs/optim/``, ``configs/schedule/``).

Optimisers: ``sgd`` and ``adamw``. Weight decay is off for norm weights and biases unless asked. With
``reference_batch_size`` the learning rate is scaled linearly from that batch to the run's global batch.

Schedules: ``cosine``, ``multistep`` and ``constant``, each after a linear warmup. Warmup and decay are
fractions of the run (the warmup capped in steps), so a 60-step run and a 90,000-step run both warm up
and decay. A schedule follows a plan (``schedule_plan``): the run's total steps, the warmup's length in
steps and the step it starts at. The warmup is fixed when it is planned: when the schedule is made, or
(``start_warmup``) when a time-limited run has measured its pace; until then (``warmup_start=None``) the
rate waits at the warmup's start. ``set_total_steps`` re-plans the run's length (``trainer.time_limit``)
and leaves the warmup as planned, so a learning rate never jumps when the length moves (except for a run cut
to less than twice its warmup: it warms up for half of what is left, so that it still decays).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)


def param_groups(model: nn.Module, weight_decay: float, norm_bias_decay: bool) -> list[dict]:
    """Trainable parameters, with weight decay off for norm weights and biases unless asked."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if norm_bias_decay or p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _positive(name: str, value, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 if allow_zero else value > 0):
        raise ValueError(f"{name}={value!r} must be a number {'>= 0' if allow_zero else '> 0'}")
    return float(value)


def scaled_lr(lr: float, reference_batch_size: int | None, global_batch: int | None) -> float:
    """``lr`` scaled linearly from ``reference_batch_size`` to ``global_batch`` (as given without a reference)."""
    lr = _positive("lr", lr)
    if reference_batch_size is None or global_batch is None:
        log.info("learning rate %.4g%s, as given (set optim.reference_batch_size to scale it linearly with the "
                 "batch)", lr, f" for a global batch of {global_batch}" if global_batch else "")
        return lr
    if isinstance(reference_batch_size, bool) or not isinstance(reference_batch_size, int) or reference_batch_size < 1:
        raise ValueError(f"reference_batch_size={reference_batch_size!r} must be an integer >= 1 (or null)")
    scaled = lr * global_batch / reference_batch_size
    log.info("learning rate %.4g = optim.lr %.4g x global batch %d / optim.reference_batch_size %d (linear scaling)",
             scaled, lr, global_batch, reference_batch_size)
    return scaled


def sgd(model: nn.Module, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 1e-4,
        nesterov: bool = False, norm_bias_decay: bool = False, reference_batch_size: int | None = None,
        global_batch: int | None = None) -> torch.optim.SGD:
    """SGD with momentum (the paper's optimiser: lr 0.01 for a batch of 16)."""
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum={momentum!r} must be in [0, 1)")
    groups = param_groups(model, _positive("weight_decay", weight_decay, True), norm_bias_decay)
    return torch.optim.SGD(groups, lr=scaled_lr(lr, reference_batch_size, global_batch), momentum=momentum,
                           nesterov=bool(nesterov))


def adamw(model: nn.Module, lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.999), weight_decay: float = 0.05,
          norm_bias_decay: bool = False, reference_batch_size: int | None = None,
          global_batch: int | None = None, fused: bool | None = True) -> torch.optim.AdamW:
    """AdamW (decoupled weight decay).

    ``fused=True`` (default): torch's fused kernel, one pass over all parameters (CPU and CUDA). On the CPU demo
    preset it takes the optimiser step from 77-117 ms to 10-19 ms (6-8x) and the whole train step 7% faster
    (``benchmarks/cpu_choices.py``, docs/notes/performance.md); the same update as the per-parameter loop, to float
    rounding. ``None``: torch's
    default (on CPU the per-parameter loop), ``False``: the loop or foreach, as torch chooses.
    """
    betas = tuple(float(b) for b in betas)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"betas={list(betas)} must be two numbers in [0, 1)")
    groups = param_groups(model, _positive("weight_decay", weight_decay, True), norm_bias_decay)
    fused = None if fused is None else bool(fused)
    if fused and not all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for g in groups
                         for p in g["params"]):
        fused = None  # the fused kernel covers float parameters on CPU and CUDA only
    return torch.optim.AdamW(groups, lr=scaled_lr(lr, reference_batch_size, global_batch), betas=betas,
                             fused=fused)


def warmup_steps(total_steps: int, warmup: float, warmup_max_steps: int | None) -> int:
    """Steps of warmup in a run of ``total_steps``: the fraction ``warmup`` of it, at most ``warmup_max_steps``,
    and always fewer than the run (so it ends with decay)."""
    steps = round(warmup * total_steps)
    if warmup_max_steps is not None:
        steps = min(steps, int(warmup_max_steps))
    return max(0, min(steps, total_steps - 1))


def lr_factor(step: int, total_steps: int, kind: str, warmup: int, warmup_factor: float = 0.001,
              milestones: Sequence[float] = (0.667, 0.889), gamma: float = 0.1, min_factor: float = 0.0) -> float:
    """Multiplier of the base learning rate at iteration ``step`` (0-based) of ``total_steps``, after ``warmup``
    steps of linear warmup from ``warmup_factor``."""
    if step < warmup:
        alpha = step / max(1, warmup)
        warm = warmup_factor * (1 - alpha) + alpha
    else:
        warm = 1.0
    if kind == "constant":
        return warm
    if kind == "multistep":
        passed = sum(step >= m * total_steps for m in milestones)
        return warm * gamma**passed
    t = min(1.0, max(0, step - warmup) / max(1, total_steps - 1 - warmup))  # cosine
    return warm * (min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * t)))


def _schedule(optimizer: torch.optim.Optimizer, total_steps: int, kind: str, warmup: float,
              warmup_max_steps: int | None, warmup_factor: float, **shape) -> torch.optim.lr_scheduler.LambdaLR:
    if not 0 <= warmup < 1:
        raise ValueError(f"warmup={warmup!r} must be a fraction of the run in [0, 1)")
    if warmup_max_steps is not None and (isinstance(warmup_max_steps, bool) or not isinstance(warmup_max_steps, int)
                                         or warmup_max_steps < 0):
        raise ValueError(f"warmup_max_steps={warmup_max_steps!r} must be an integer >= 0 or null")
    if not 0 <= warmup_factor <= 1:
        raise ValueError(f"warmup_factor={warmup_factor!r} must be in [0, 1]")
    # a plain function (not a callable object): LambdaLR then keeps the plan out of its state_dict,
    # so a resumed run follows its own config (and a time-limited one the plan its checkpoint keeps)
    plan = {"total_steps": int(total_steps), "warmup_steps": warmup_steps(int(total_steps), warmup, warmup_max_steps),
            "warmup_start": 0}

    def factor(step: int) -> float:
        start = plan["warmup_start"]
        if start is None:  # the run's length is not planned yet: the rate waits at the warmup's start
            return warmup_factor
        total = plan["total_steps"] - start  # the schedule runs from its warmup's start to the run's end
        # a run cut to less than twice its warmup warms up for half of it (or the fraction asked): it still decays
        warm = min(plan["warmup_steps"], max(warmup_for(total), total // 2))
        return lr_factor(step - start, total, kind, warm, warmup_factor, **shape)

    def warmup_for(steps: int) -> int:
        return warmup_steps(steps, warmup, warmup_max_steps)

    factor.plan, factor.warmup_for = plan, warmup_for
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float = 0.05,
           warmup_max_steps: int | None = 1000, warmup_factor: float = 0.001,
           min_factor: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then cosine decay to ``min_factor`` x lr at the last step."""
    if not 0 <= min_factor <= 1:
        raise ValueError(f"min_factor={min_factor!r} must be in [0, 1]")
    return _schedule(optimizer, total_steps, "cosine", warmup, warmup_max_steps, warmup_factor, min_factor=min_factor)


def multistep(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float = 0.05,
              warmup_max_steps: int | None = 500, warmup_factor: float = 0.001,
              milestones: Sequence[float] = (0.667, 0.889), gamma: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then lr x ``gamma`` at each milestone (fractions of the run: the paper's 60k and 80k of 90k)."""
    milestones = tuple(float(m) for m in milestones)
    if any(not 0 < m < 1 for m in milestones):
        raise ValueError(f"milestones={list(milestones)} must be fractions of training in (0, 1)")
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma={gamma!r} must be in (0, 1]")
    return _schedule(optimizer, total_steps, "multistep", warmup, warmup_max_steps, warmup_factor,
                     milestones=milestones, gamma=gamma)


def constant(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float = 0.05,
             warmup_max_steps: int | None = 500, warmup_factor: float = 0.001) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then the base learning rate to the end."""
    return _schedule(optimizer, total_steps, "constant", warmup, warmup_max_steps, warmup_factor)


def schedule_plan(scheduler: torch.optim.lr_scheduler.LambdaLR) -> dict:
    """The plan a schedule of this module follows: ``total_steps``, ``warmup_steps``, ``warmup_start`` (None: the
    warmup waits at its start)."""
    return dict(scheduler.lr_lambdas[0].plan)


def set_schedule_plan(scheduler: torch.optim.lr_scheduler.LambdaLR, **plan) -> None:
    """Change the plan of a schedule of this module (keys of ``schedule_plan``); the current learning rate follows
    at once."""
    unknown = set(plan) - {"total_steps", "warmup_steps", "warmup_start"}
    if unknown:
        raise ValueError(f"not keys of a schedule's plan: {sorted(unknown)}")
    for fn in scheduler.lr_lambdas:
        fn.plan.update(plan)
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def set_total_steps(scheduler: torch.optim.lr_scheduler.LambdaLR, total_steps: int) -> None:
    """Re-plan a schedule of this module for a run of ``total_steps``; its warmup stays as planned."""
    set_schedule_plan(scheduler, total_steps=int(total_steps))


def start_warmup(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Plan the warmup from the current step on: the schedule's fraction of the steps left (at most its cap)."""
    step = scheduler.last_epoch
    for fn in scheduler.lr_lambdas:
        fn.plan.update(warmup_start=step, warmup_steps=fn.warmup_for(max(1, fn.plan["total_steps"] - step)))
    set_schedule_plan(scheduler)


def total_steps_of(scheduler: torch.optim.lr_scheduler.LambdaLR) -> int:
    """The run length a schedule of this module is planned for."""
    return int(schedule_plan(scheduler)["total_steps"])
