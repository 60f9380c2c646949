"""The run's length in optimiser steps: ``trainer.epochs`` worth, or planned per step to fit ``trainer.time_limit``.

``plan_run`` makes a run's ``RunPlan``, the one place that knows the length and keeps the learning-rate
schedule to it; the training loop only reports each step to it (``RunPlan.after_step``).

The time limit's rule, what a user can rely on:

- With ``trainer.epochs`` set, the limit is a cap: the run trains the epochs asked for, or fewer steps if
  they would not fit; its warmup is planned for the epochs asked for and runs from step 1. With
  ``trainer.epochs=null`` the run fills the budget (it plans as many steps as fit); its warmup is planned
  once the pace is measured, as ``schedule.warmup`` of the steps then left, and starts there (the first 4
  steps wait at the warmup's starting rate). Either way the warmup's length, once planned, does not change
  (``retinanet.optim``).
- The pace is the mean duration of the last 100 timed steps (``WINDOW``), each counted at most 3x their
  median (``CLIP``): a one-off slow step (a recompilation for a new shape) does not move the plan. The
  first 3 steps after every (re)start of training in a process (``SETTLE_STEPS``: loader start-up,
  ``torch.compile``'s compilation, allocator warm-up) are not timed; their seconds still count.
- The plan is made from the pace after every step; after the first plan each re-plan changes the total
  by at most 5% (``MAX_CHANGE``) or one step, so the decay follows the run's end without jumps. The run
  never starts a step that would end past the limit: if the pace says the next step would, it ends there.
- Evaluation and epoch-end checkpoints are not counted.
- A checkpoint keeps the plan (total, warmup) and the pace: a resumed run plans with the pace it resumed,
  so it continues the learning-rate curve the uninterrupted run would have followed (less the steps its
  restart's seconds cost).
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque

from retinanet import distributed
from retinanet.optim import schedule_plan, set_schedule_plan, set_total_steps, start_warmup, total_steps_of

log = logging.getLogger(__name__)
SETTLE_STEPS = 3     # steps after each (re)start left out of the pace
WINDOW = 100         # the pace is the mean of this many recent timed steps ...
CLIP = 3.0           # ... each counted at most this many times their median
MAX_CHANGE = 1.05    # a re-plan changes the total by at most this factor (after the first plan)


class TimeBudget:
    """Plans the total number of optimiser steps of a run from its pace (the module docstring has the rule).

    ``limit_s``: seconds of training; ``planned_steps``: the steps asked for (None: fill the budget);
    ``margin``: the share of the budget held back for the pace's noise (the run still ends within a few
    percent of the limit).
    """

    def __init__(self, limit_s: float, planned_steps: int | None, margin: float = 0.01, settle: int = SETTLE_STEPS,
                 window: int = WINDOW, clip: float = CLIP, max_change: float = MAX_CHANGE):
        if not limit_s > 0:
            raise ValueError(f"time limit {limit_s!r} must be > 0 seconds")
        if not max_change > 1:
            raise ValueError(f"max_change={max_change!r} must be > 1")
        self.limit_s, self.planned_steps = float(limit_s), planned_steps
        self.margin, self.settle, self.clip, self.max_change = float(margin), int(settle), float(clip), max_change
        self.recent: deque[float] = deque(maxlen=window)
        self.last_spent: float | None = None
        self.settling = self.settle

    @property
    def fills(self) -> bool:
        return self.planned_steps is None

    def start(self, spent_s: float) -> None:
        """Training (re)starts in this process with ``spent_s`` seconds spent: the next ``settle`` steps are not
        timed."""
        self.last_spent, self.settling = spent_s, self.settle

    def record(self, spent_s: float) -> None:
        """Training seconds spent so far, after a step."""
        if self.last_spent is not None and self.settling <= 0 and spent_s > self.last_spent:
            self.recent.append(spent_s - self.last_spent)
        self.settling -= 1
        self.last_spent = spent_s

    def pace(self) -> float | None:
        """Seconds per step (see the module docstring), None before any step was timed."""
        if not self.recent:
            return None
        cap = self.clip * statistics.median(self.recent)
        return sum(min(d, cap) for d in self.recent) / len(self.recent)

    def total_steps(self, steps_done: int, spent_s: float, current_total: int, bounded: bool = True) -> int:
        """The run's total steps now: the steps that fit in what is left of the budget at the current pace
        (``bounded``: within a factor ``max_change`` of ``current_total``, or one step; never fewer than those done; with
        ``planned_steps``, never more than those)."""
        pace = self.pace()
        if pace is None or pace <= 0:
            return current_total
        left = self.limit_s * (1.0 - self.margin) - spent_s
        total = steps_done + max(0, math.floor(left / pace))
        if bounded:  # within the factor, or one step
            lo = min(current_total - 1, math.ceil(current_total / self.max_change))
            hi = max(current_total + 1, math.floor(current_total * self.max_change))
            total = min(max(total, lo), hi)
        if not self.fills:
            total = min(self.planned_steps, total)
        return max(steps_done, total)

    def exhausted(self, spent_s: float) -> bool:
        """Would one more step at the current pace end past the limit?"""
        return spent_s + (self.pace() or 0.0) >= self.limit_s

    def state_dict(self) -> dict:
        return {"recent": list(self.recent)}

    def load_state_dict(self, state: dict) -> None:
        self.recent.clear()
        self.recent.extend(float(d) for d in state.get("recent", []))


class RunPlan:
    """How many optimiser steps the run trains, with its schedule kept planned for that many.

    ``budget``: a ``TimeBudget`` that re-plans the run after every step (None: the schedule's plan is fixed);
    ``spent_s``: the training seconds already spent (a resumed run's). Rank 0's plan is broadcast, so every
    rank trains the same number of steps with the same learning rates.
    """

    def __init__(self, scheduler, budget: TimeBudget | None = None, spent_s: float = 0.0):
        self.scheduler, self.budget = scheduler, budget
        if budget is not None:
            budget.start(spent_s)

    @property
    def total(self) -> int:
        return total_steps_of(self.scheduler)

    @property
    def planned_steps(self) -> int | None:
        """What checkpoints keep: the planned total under a time limit, else None (the config says it)."""
        return self.total if self.budget is not None else None

    def state_dict(self) -> dict | None:
        """The plan (total, warmup) and the pace, for checkpoints; None without a time limit."""
        return None if self.budget is None else {**schedule_plan(self.scheduler), **self.budget.state_dict()}

    def after_step(self, step: int, spent_s: float) -> bool:
        """Step ``step`` ended with ``spent_s`` training seconds spent: re-plan; are the run's steps done?"""
        if self.budget is not None:
            self.budget.record(spent_s)
            self._replan(step, spent_s)
        return step >= self.total

    def _replan(self, step: int, spent_s: float) -> None:
        planned = schedule_plan(self.scheduler)["warmup_start"] is not None
        if self.budget.exhausted(spent_s):
            total = step  # the limit: the run ends here, whatever the plan said
        else:
            total = self.budget.total_steps(step, spent_s, self.total, bounded=planned)
        total, first_plan = distributed.broadcast_object((total, not planned and self.budget.pace() is not None))
        if total != self.total:
            set_total_steps(self.scheduler, total)
        if first_plan:
            start_warmup(self.scheduler)
            log.info("trainer.time_limit: %d steps planned from the pace (%.3g s a step), warmup %d steps from "
                     "step %d", total, self.budget.pace(), schedule_plan(self.scheduler)["warmup_steps"], step + 1)


def plan_run(scheduler, steps_per_epoch: int, epochs: int | None, time_limit: float | None,
             saved: dict | None = None, planned_steps: int | None = None, spent_s: float = 0.0) -> RunPlan:
    """The plan of a run of ``epochs`` (None: as many as ``time_limit`` seconds hold). A resumed run passes what
    its checkpoint kept: ``saved`` (``RunPlan.state_dict()``), ``planned_steps`` (older checkpoints: the total
    only) and the training seconds ``spent_s``."""
    total = (epochs or 1) * steps_per_epoch
    if not time_limit:
        set_total_steps(scheduler, total)
        return RunPlan(scheduler)
    budget = TimeBudget(time_limit, total if epochs else None)
    log.info("trainer.time_limit=%gs of training: %s", time_limit,
             "the run plans as many steps as fit, from its pace" if budget.fills else
             f"at most {epochs} epochs; fewer steps if they would not fit, from the pace")
    if saved is not None:
        budget.load_state_dict(saved)
        set_schedule_plan(scheduler, **{k: saved[k] for k in ("total_steps", "warmup_steps", "warmup_start")})
    elif planned_steps is not None:
        set_total_steps(scheduler, planned_steps)
    elif budget.fills and spent_s == 0:  # the length is unknown until the pace is: enough steps to measure it
        set_schedule_plan(scheduler, total_steps=max(total, budget.settle + 1), warmup_start=None)
    else:
        set_total_steps(scheduler, total)
    return RunPlan(scheduler, budget, spent_s)


def train_seconds(history: list[dict]) -> float:
    """Training seconds of the epochs in a run's history (``metrics.json`` / checkpoint entries)."""
    return float(sum(entry["train"]["seconds"] for entry in history))
