"""Where a train step's time goes, ours vs torchvision: self CPU time by operator family (torch.profiler).

The same models, inputs and optimizers as `make bench` item 3 (benchmarks.train). Shows why the
train-step ratio cannot move far from 1 on a CPU: convolutions, identical on both sides, take most of it.

Examples:
    python benchmarks/profile_train_step.py                     # both presets
    python benchmarks/profile_train_step.py --preset retinanet_r18_cpu --steps 3 --threads 1
"""

import argparse
import collections
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from benchmarks import train  # noqa: E402

# operator-name fragments per family, matched in this order (the first match wins)
FAMILIES = (
    ("convolution", ("conv",)),
    ("optimizer (foreach)", ("_foreach",)),
    ("batch/group norm", ("batch_norm", "group_norm")),
    ("elementwise", ("relu", "add", "mul", "threshold", "div", "sub", "sqrt", "addcdiv", "addcmul", "lerp", "where")),
    ("copies and layout", ("copy_", "contiguous", "clone", "empty", "zero_", "fill_")),
    ("pooling and upsampling", ("max_pool", "upsample", "interpolate")),
)
PRESETS = {"retinanet_r50": (2, 256, "sgd"), "retinanet_r18_cpu": (16, 160, "adamw")}  # as in `make bench`


def family(op_name: str) -> str:
    name = op_name.lower()
    return next((fam for fam, keys in FAMILIES if any(k in name for k in keys)), "other")


def profile_step(step, steps: int) -> tuple[dict, float]:
    """Self CPU seconds per family over ``steps`` calls of ``step`` (after two warm-up calls), and the total."""
    step()
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    totals = collections.Counter()
    for event in prof.key_averages():
        totals[family(event.key)] += event.self_cpu_time_total / 1e6
    return dict(totals), sum(totals.values())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), nargs="+", default=list(PRESETS), help="presets to profile")
    p.add_argument("--steps", type=int, default=2, help="profiled steps per contender (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {}
    for preset in args.preset:
        batch, size, optim = PRESETS[preset]
        state = train.setup(preset=preset, batch=batch, height=size, width=size, optim=optim, nchw=False)
        for side, step in (("ours", state.step_ours), ("torchvision", state.step_tv)):
            totals, total = profile_step(step, args.steps)
            shares = sorted(totals.items(), key=lambda kv: -kv[1])
            print(f"{preset} ({batch}x{size}x{size}) {side}: {total / args.steps:.2f} s/step self CPU; "
                  + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in shares))
            out[f"{preset}/{side}"] = {"seconds_per_step": total / args.steps, "shares": {k: v / total for k, v in shares}}
    return out


if __name__ == "__main__":
    main()
