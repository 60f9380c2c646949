"""Timing: our and torchvision's version of a case run in turns in one process, medians reported.

Absolute times on a shared machine are noise, so every round runs each contender once (the order
alternates between rounds) and the ratio is the median over rounds of ``ours / torchvision`` in the
same round: a load spike hits both sides of a round alike.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Wall and CPU seconds of every function over ``repeats`` rounds, after ``warmup`` untimed rounds."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            gc.collect()
            c0, t0 = time.process_time(), time.perf_counter()
            fns[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {name: {"median_s": statistics.median(wall[name]), "min_s": min(wall[name]),
                   "cpu_median_s": statistics.median(cpu[name]), "wall_s": wall[name], "cpu_s": cpu[name]}
            for name in names}


def round_ratio(times: dict[str, dict], ours: str, theirs: str, key: str = "wall_s") -> float:
    """Median over rounds of ``ours / theirs`` (``key``: ``wall_s`` or ``cpu_s``)."""
    return statistics.median(a / b for a, b in zip(times[ours][key], times[theirs][key]) if b > 0)
