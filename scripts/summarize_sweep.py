"""Summarise a Hydra multirun: `python scripts/summarize_sweep.py <sweep dir> [--out DIR]`.

Writes summary.md and summary.csv (every run's overrides and final COCO numbers, sorted by val AP)
and heatmap.png (val AP over loss.gamma x loss.alpha, or --rows / --cols), then prints the table.

Examples:
    python scripts/summarize_sweep.py multirun/shapes/2026-01-01_12-00-00
    python scripts/summarize_sweep.py multirun/shapes/latest --rows optim.lr --cols loss.gamma --metric AP50
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from retinanet.evaluation import STAT_NAMES  # noqa: E402
from retinanet.sweep import summarize_sweep  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="the multirun folder (hydra.sweep.dir), holding one folder per run")
    parser.add_argument("--out", default=None, help="where to write the summary (default: the sweep dir)")
    parser.add_argument("--rows", default="loss.gamma", help="config key for the heatmap rows (default loss.gamma)")
    parser.add_argument("--cols", default="loss.alpha", help="config key for the heatmap columns (default loss.alpha)")
    parser.add_argument("--metric", default="AP", choices=STAT_NAMES, help="COCO number in the heatmap (default AP)")
    args = parser.parse_args(argv)
    try:
        out = summarize_sweep(args.sweep_dir, args.out, args.rows, args.cols, args.metric)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out["markdown"].read_text())
    print(f"written: {out['markdown']}, {out['csv']}" + (f", {out['heatmap']}" if out["heatmap"] else
                                                        " (no heatmap: no run finished)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
