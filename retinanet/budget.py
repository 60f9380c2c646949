"""``trainer.time_limit``: a run that must end within a wall-clock budget shortens itself.

After every epoch the trainer asks ``epochs_within`` how many epochs fit: the training seconds
spent so far (this process and any run it resumed) plus the remaining epochs at the pace of the
latest one must stay within the limit. Only ever fewer epochs than planned, never more, and never
fewer than those already trained; the learning-rate schedule is then re-planned to end with the
new last epoch (``retinanet.optim.set_total_steps``), so a short run still anneals to its end.
Evaluation time is not counted: the limit is on training.
"""

from __future__ import annotations

import math


def epochs_within(limit_s: float, planned: int, done: int, spent_s: float, last_epoch_s: float) -> int:
    """Total epochs of a run with ``done`` epochs trained in ``spent_s`` seconds (the latest in
    ``last_epoch_s``) that fit in ``limit_s`` seconds: between ``done`` and ``planned``."""
    if last_epoch_s <= 0:
        return planned
    more = math.floor(max(0.0, limit_s - spent_s) / last_epoch_s + 1e-9)
    return max(done, min(planned, done + more))


def train_seconds(history: list[dict]) -> float:
    """Training seconds of the epochs in a run's history (``metrics.json`` / checkpoint entries)."""
    return float(sum(entry["train"]["seconds"] for entry in history))
