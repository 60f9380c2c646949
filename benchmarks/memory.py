"""Peak memory of one contender of one case, measured in a fresh subprocess.

``python -m benchmarks.memory <case> <contender> '<params json>'`` builds the case, runs the
contender once (warm-up: lazy initialisation, caches), then frees what it can (``gc``, glibc
``malloc_trim``), resets the kernel's resident-set high-water mark (``/proc/self/clear_refs``,
value 5), reads the current RSS as the baseline, runs the contender again and prints the
high-water mark (``VmHWM``) minus that baseline: the extra resident memory the run needed at its
peak, inputs and model excluded. glibc is told to serve every block above 64 KiB with ``mmap``
(``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave the resident set at once and a run cannot
hide its peak in memory kept from the warm-up.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys
from importlib import import_module
from pathlib import Path

ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_here(fn) -> dict:
    """Extra peak resident memory (MiB) of ``fn()`` in this process (call once before, as warm-up)."""
    _release()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    return {"peak_mib": (peak - base) / 1024, "baseline_mib": base / 1024}


def peak_memory(case: str, contender: str, params: dict, threads: int | None = None, timeout: float = 900) -> dict:
    """Run ``measure_here`` for ``case``'s ``contender`` in a fresh Python process; returns its result."""
    repo = str(Path(__file__).resolve().parents[1])  # `benchmarks` is a folder of the checkout, not installed
    env = {**os.environ, **ENV, "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)}
    args = [sys.executable, "-m", "benchmarks.memory", case, contender, json.dumps(params)]
    if threads:
        args.append(str(threads))
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory run of {case}/{contender} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    case, contender, params = argv[0], argv[1], json.loads(argv[2])
    if len(argv) > 3:
        import torch

        torch.set_num_threads(int(argv[3]))
    module = import_module(f"benchmarks.{case}")
    state = module.setup(**params)
    fn = module.contenders(state)[contender]
    fn()  # warm-up
    print(json.dumps(measure_here(fn)))


if __name__ == "__main__":
    main(sys.argv[1:])
