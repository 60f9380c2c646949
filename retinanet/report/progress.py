"""How a training run shows its progress: tqdm bars on a terminal, a log line every so often elsewhere.

``trainer.progress``:

- ``auto`` (the default): bars when stdout and stderr are both terminals (``bars_wanted``); otherwise (a
  SLURM or CI log file, ``> train.log``) no bars, whose carriage returns would fill the file, and instead a
  ``ProgressLog`` line every ``trainer.log_every_seconds`` (and after the first step);
- ``true``: bars, wherever they go; ``false``: neither bars nor periodic lines (a line per epoch).

A line (rank 0's, through the ``retinanet.report.progress`` logger, so it lands in the run's log file too)::

    step 120/5000 (epoch 1): 45.3 images/s, loss 0.8123 (cls 0.5101, box 0.3022), lr 1.00e-04, about 1h48m left

``images/s`` and the losses are over the steps since the previous line (the losses: their mean over the
finite steps); the time left is the training time of the plan's remaining steps at that pace (evaluations
not counted), within a ``trainer.time_limit`` if the run has one.
"""

from __future__ import annotations

import logging
import math
import sys
import time

log = logging.getLogger(__name__)


def bars_wanted(setting) -> bool:
    """``trainer.progress`` (true, false or auto) -> show tqdm bars?"""
    if setting == "auto":
        return all(hasattr(s, "isatty") and s.isatty() for s in (sys.stdout, sys.stderr))
    return bool(setting)


def lines_wanted(setting) -> bool:
    """``trainer.progress`` -> log periodic progress lines (``auto`` without bars)?"""
    return setting == "auto" and not bars_wanted(setting)


def duration(seconds: float) -> str:
    """``3h05m``, ``12m30s``, ``45s``."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class ProgressLog:
    """Logs a progress line after the first step and then every ``every_s`` seconds of wall time.

    ``plan``: the run's ``retinanet.budget.RunPlan`` (its total steps and time limit); ``clock``: seconds
    (``time.monotonic``)."""

    def __init__(self, every_s: float, plan, clock=time.monotonic):
        if isinstance(every_s, bool) or not isinstance(every_s, (int, float)) or not every_s > 0:
            raise ValueError(f"every_s={every_s!r} must be a number of seconds > 0")
        self.every_s, self.plan, self.clock = float(every_s), plan, clock
        self.last_time: float | None = None  # wall time of the previous line (None: no line yet)
        self._reset(None, None)

    def _reset(self, step: int | None, spent_s: float | None) -> None:
        self.from_step, self.from_spent = step, spent_s
        self.images, self.sums, self.counted = 0, {}, 0

    def after_step(self, result, epoch: int, spent_s: float) -> str | None:
        """Step ``result`` (a ``StepResult``) of ``epoch`` ended with ``spent_s`` training seconds spent; returns the
        line if one was logged."""
        if self.from_step is None:  # the first step of this process: a start line, timed from here on
            self._reset(result.step - 1, None)
        self.images += result.images
        if not result.skipped:
            for k, v in result.terms.items():
                self.sums[k] = self.sums.get(k, 0.0) + v
            self.counted += 1
        now = self.clock()
        if self.last_time is not None and now - self.last_time < self.every_s:
            return None
        line = self.line(result, epoch, spent_s)
        log.info("%s", line)
        self.last_time = now
        self._reset(result.step, spent_s)
        return line

    def line(self, result, epoch: int, spent_s: float) -> str:
        total = self.plan.total if self.plan is not None else result.step
        seconds = spent_s - self.from_spent if self.from_spent is not None else math.nan
        steps = result.step - self.from_step
        rate = f"{self.images / seconds:.1f} images/s" if seconds > 0 else "images/s: measuring"
        means = {k: v / self.counted for k, v in self.sums.items()} if self.counted else {}
        losses = (f"loss {means['loss']:.4f} (cls {means['loss_cls']:.4f}, box {means['loss_box']:.4f})"
                  if {"loss", "loss_cls", "loss_box"} <= means.keys() else "loss n/a (non-finite steps)")
        left = (total - result.step) * seconds / steps if seconds > 0 and steps > 0 else math.nan
        budget = getattr(self.plan, "budget", None)
        if budget is not None and math.isfinite(left):
            left = min(left, budget.limit_s - spent_s)
        left_text = f"about {duration(left)} left" if math.isfinite(left) else "time left: measuring"
        return f"step {result.step}/{total} (epoch {epoch}): {rate}, {losses}, lr {result.lr:.2e}, {left_text}"
