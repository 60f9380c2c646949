"""Benchmark against torchvision's RetinaNet, side by side in one process: `make bench` (docs/notes/benchmarks.md).

Prints a Markdown table of ratios ours / torchvision (lower is better; items 4-7 are fractions) and
writes everything measured to a JSON file.

Examples:
    python benchmarks/bench.py                                   # all cases -> outputs/bench/bench.json
    python benchmarks/bench.py --out /tmp/b.json --cases loss postprocess --threads 1
    python benchmarks/bench.py --size tiny --no-memory           # seconds: checks the harness only
    python benchmarks/bench.py --device cuda --no-memory          # GPU rows: loss, postprocess, train, inference
    python benchmarks/bench.py --cases flops --no-r50 --threads 1  # items 6-7 only: conv peak, FLOP/s, step split
"""

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from benchmarks.report import markdown  # noqa: E402
from benchmarks.runner import CASES, SIZES, run  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="outputs/bench/bench.json", help="JSON file to write (default: %(default)s)")
    p.add_argument("--size", choices=sorted(SIZES), default="full", help="input sizes (default: %(default)s)")
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="cases to run (default: all)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--data-root", default=None, help="generated shapes dataset for items 4-5 (default: data/shapes)")
    p.add_argument("--no-r50", action="store_true", help="skip the R50 preset's cases (train, inference, FLOP/s): "
                   "its bf16 step is slow where bf16 is emulated")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: on CUDA only the cases loss, postprocess,\n"
                   "train and inference run (ours vs torchvision on the GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1) / 2:
        logging.warning("load average %.1f on %d cores: other processes compete for the CPU; ratios are paired "
                        "per round, but multi-threaded runs suffer most (try --threads 1)", load, os.cpu_count())
    out = Path(args.out)
    report = run(args.size, out.parent, cases=args.cases, memory=not args.no_memory, data_root=args.data_root,
                 r50=not args.no_r50, device=args.device)
    report["command"] = " ".join(["python benchmarks/bench.py", *(argv if argv is not None else sys.argv[1:])])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, out)
    m = report["machine"]
    gpu = f"{m['gpu']}, " if "gpu" in m else ""
    print(f"\n{markdown(report['rows'])}\n\n{gpu}{m['cores']} cores, {m['torch_threads']} torch threads, load average "
          f"{m['loadavg_1min']:.1f}, torch {m['torch']}, torchvision {m['torchvision']}; {m['seconds']:.0f} s; "
          f"JSON: {out}")
    return report


if __name__ == "__main__":
    main()
