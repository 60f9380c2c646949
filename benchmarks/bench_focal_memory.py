"""Peak memory of the focal loss, forward + backward, on a COCO-sized input: ours against torchvision's.

Cases (each in its own process, so one cannot inherit another's freed-but-kept memory):
  torchvision   ``torchvision.ops.sigmoid_focal_loss(x, one_hot, 0.25, 2, "sum")``
  dense         ``retinanet.losses.sigmoid_focal_loss(x, one_hot, 0.25, 2, "sum")`` (same inputs)
  labels        ``retinanet.losses.FocalLossFromLabels`` on integer labels (what ``RetinaNetLoss`` runs)

``x`` is ``[images * anchors, classes]`` float32 (default 2 x 120,000 x 80, one tensor = 76.8 MB); the
dense cases also hold a one-hot float target of the same size, the label case an int64 vector.
Inputs are made in place before measuring. Measured: the peak resident set during forward +
backward (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``; ``ru_maxrss`` if that is not
allowed) minus the resident set just before. That includes the gradient ``x.grad`` (one ``[N, K]``).

Usage: ``python benchmarks/bench_focal_memory.py [--images 2] [--anchors 120000] [--classes 80]``
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

CASES = ("torchvision", "dense", "labels")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        return True
    except OSError:
        return False


def run_case(case: str, images: int, anchors: int, classes: int, threads: int) -> dict:
    """One measurement in this process: MB of extra peak memory and seconds for forward + backward."""
    import torch
    import torchvision

    from retinanet.losses import FocalLossFromLabels, sigmoid_focal_loss

    torch.set_num_threads(threads)
    n = images * anchors
    g = torch.Generator().manual_seed(0)
    x = torch.empty(n, classes).normal_(generator=g).mul_(2.0).sub_(4.0).requires_grad_()  # in place: no temporaries
    labels = torch.full((n,), -1, dtype=torch.int64)  # background
    pos = torch.randint(0, n, (n // 500,), generator=g)  # ~0.2% positives, as in COCO training
    labels[pos] = torch.randint(0, classes, (len(pos),), generator=g)
    target = None
    if case != "labels":
        target = torch.zeros(n, classes)
        fg = labels >= 0
        target[fg.nonzero().squeeze(1), labels[fg]] = 1.0
        del fg
    before_kb = _status_kb("VmRSS")
    exact = _reset_peak()
    before_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if case == "torchvision":
        loss = torchvision.ops.sigmoid_focal_loss(x, target, 0.25, 2.0, reduction="sum")
    elif case == "dense":
        loss = sigmoid_focal_loss(x, target, 0.25, 2.0, reduction="sum")
    else:
        loss = FocalLossFromLabels.apply(x, labels, 0.25, 2.0, 0.0, None)
    loss.backward()
    seconds = time.perf_counter() - t0
    peak_kb = _status_kb("VmHWM") if exact else max(before_max, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    tensor_mb = n * classes * 4 / 1e6
    return {"case": case, "extra_peak_mb": (peak_kb - before_kb) * 1024 / 1e6, "tensor_mb": tensor_mb,
            "inputs_mb": tensor_mb * (1 if target is None else 2) + n * 8 / 1e6, "seconds": seconds,
            "loss": float(loss), "method": "VmHWM" if exact else "ru_maxrss (upper bound)"}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--anchors", type=int, default=120_000, help="anchors per image")
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (memory does not depend on it)")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # child process: one case, JSON out
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case, args.images, args.anchors, args.classes, args.threads)))
        return []
    results = []
    for case in CASES:
        cmd = [sys.executable, __file__, "--case", case, "--images", str(args.images), "--anchors",
               str(args.anchors), "--classes", str(args.classes), "--threads", str(args.threads)]
        results.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    r0 = results[0]
    print(f"focal loss forward + backward on [{args.images} x {args.anchors} anchors, {args.classes} classes] "
          f"float32 (one such tensor = {r0['tensor_mb']:.1f} MB), peak memory above the inputs ({r0['method']}):")
    print(f"  {'case':<12} {'inputs MB':>10} {'extra peak MB':>14} {'x tensor':>9} {'seconds':>8}  loss")
    for r in results:
        print(f"  {r['case']:<12} {r['inputs_mb']:>10.1f} {r['extra_peak_mb']:>14.1f} "
              f"{r['extra_peak_mb'] / r['tensor_mb']:>8.1f}x {r['seconds']:>8.2f}  {r['loss']:.6g}")
    return results


if __name__ == "__main__":
    main()
