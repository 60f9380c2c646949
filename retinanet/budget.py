"""The run's length in optimiser steps: ``trainer.epochs`` worth, or planned per step to fit ``trainer.time_limit``.

``plan_run`` makes a run's ``RunPlan``, the one place that knows the length and keeps the learning-rate
schedule to it; the training loop only reports each step to it (``RunPlan.after_step``).

The time limit's rule: with ``trainer.epochs`` set, the limit is a cap (the run trains the epochs asked
for, or fewer steps if they would not fit); with ``trainer.epochs=null`` the run fills the budget (it
plans as many steps as fit). Either way the plan is made from the measured pace after every step, the
learning-rate schedule is re-planned to end with the last step (``retinanet.optim.set_total_steps``),
and the run never starts a step that would end past the limit. Evaluation and epoch-end checkpoints are
not counted.
"""

from __future__ import annotations

import logging
import math
from collections import deque

from retinanet import distributed
from retinanet.optim import set_total_steps, total_steps_of

log = logging.getLogger(__name__)


class TimeBudget:
    """Plans the total number of optimiser steps of a run from its pace.

    ``limit_s``: seconds of training; ``planned_steps``: the steps asked for (None: fill the budget);
    ``window``: the pace is the mean duration of this many recent steps; ``margin``: the share of the
    budget held back for the pace's noise (the run still ends within a few percent of the limit).
    """

    def __init__(self, limit_s: float, planned_steps: int | None, window: int = 20, margin: float = 0.01):
        if not limit_s > 0:
            raise ValueError(f"time limit {limit_s!r} must be > 0 seconds")
        self.limit_s, self.planned_steps = float(limit_s), planned_steps
        self.margin = float(margin)
        self.recent: deque[float] = deque(maxlen=window)
        self.last_spent: float | None = None

    @property
    def fills(self) -> bool:
        return self.planned_steps is None

    def pace(self) -> float | None:
        """Seconds per step (mean of the recent steps), None before any step was timed."""
        return sum(self.recent) / len(self.recent) if self.recent else None

    def record(self, spent_s: float) -> None:
        """Training seconds spent so far, after a step (the first call only sets the origin)."""
        if self.last_spent is not None and spent_s > self.last_spent:
            self.recent.append(spent_s - self.last_spent)
        self.last_spent = spent_s

    def reset_clock(self, spent_s: float) -> None:
        """A pause that is not training (evaluation, a resume): the next step is timed from ``spent_s``."""
        self.last_spent = spent_s

    def total_steps(self, steps_done: int, spent_s: float, current_total: int) -> int:
        """The run's total steps now: the steps that fit in what is left of the budget at the current pace
        (never fewer than those done; with ``planned_steps``, never more than those)."""
        pace = self.pace()
        if pace is None or pace <= 0:
            return current_total
        left = self.limit_s * (1.0 - self.margin) - spent_s
        fit = steps_done + max(0, math.floor(left / pace))
        return max(steps_done, fit if self.fills else min(self.planned_steps, fit))

    def exhausted(self, spent_s: float) -> bool:
        """Would one more step at the current pace end past the limit?"""
        pace = self.pace() or 0.0
        return spent_s + pace >= self.limit_s


class RunPlan:
    """How many optimiser steps the run trains, with its schedule kept planned for that many.

    ``total``: the steps planned now; ``budget``: a ``TimeBudget`` that re-plans them after every step
    (None: ``total`` is fixed); ``spent_s``: the training seconds already spent (a resumed run's).
    Rank 0's plan is broadcast, so every rank trains the same number of steps.
    """

    def __init__(self, scheduler, total: int, budget: TimeBudget | None = None, spent_s: float = 0.0):
        self.scheduler, self.budget = scheduler, budget
        set_total_steps(scheduler, total)
        if budget is not None:
            budget.reset_clock(spent_s)

    @property
    def total(self) -> int:
        return total_steps_of(self.scheduler)

    @property
    def planned_steps(self) -> int | None:
        """What checkpoints keep: the planned total under a time limit, else None (the config says it)."""
        return self.total if self.budget is not None else None

    def after_step(self, step: int, spent_s: float) -> bool:
        """Step ``step`` ended with ``spent_s`` training seconds spent: re-plan; are the run's steps done?"""
        if self.budget is not None:
            self.budget.record(spent_s)
            total = step if self.budget.exhausted(spent_s) else self.budget.total_steps(step, spent_s, self.total)
            total = distributed.broadcast_object(total)
            if total != self.total:
                set_total_steps(self.scheduler, total)
        return step >= self.total


def plan_run(scheduler, steps_per_epoch: int, epochs: int | None, time_limit: float | None,
             planned_steps: int | None = None, spent_s: float = 0.0) -> RunPlan:
    """The plan of a run of ``epochs`` (None: as many as ``time_limit`` seconds hold); a resumed run passes the
    ``planned_steps`` and training seconds ``spent_s`` of its checkpoint."""
    total = (epochs or 1) * steps_per_epoch
    if not time_limit:
        return RunPlan(scheduler, total)
    budget = TimeBudget(time_limit, epochs * steps_per_epoch if epochs else None)
    log.info("trainer.time_limit=%gs of training: %s", time_limit,
             "the run plans as many steps as fit, from its pace" if budget.fills else
             f"at most {epochs} epochs; fewer steps if they would not fit, from the pace")
    return RunPlan(scheduler, planned_steps if planned_steps is not None else total, budget, spent_s)


def train_seconds(history: list[dict]) -> float:
    """Training seconds of the epochs in a run's history (``metrics.json`` / checkpoint entries)."""
    return float(sum(entry["train"]["seconds"] for entry in history))
