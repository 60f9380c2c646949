"""Real data, equal compute: our trainer, run as the README says, against a plain torchvision script.

    python benchmarks/real/run.py                         # BCCD (../shared/datasets/bccd), 600 s each, 1 pair
    python benchmarks/real/run.py --runs 2 --seconds 600 --categories WBC   # a one-class subset of it
    make bench-real ARGS="--runs 2"

What it does, as a new user would:
1. converts the Pascal VOC dataset with the project's converter (``scripts/convert_to_coco.py --format voc``,
   ``ImageSets/Main/train.txt`` and ``val.txt``; ``--eval-split test`` scores on ``test.txt`` instead) into
   ``data/<dataset>/``; ``--categories`` keeps some classes only (``make_subset.py``);
2. starts the two trainings at the same moment, each pinned to its own core with one thread
   (``taskset``, ``OMP_NUM_THREADS=1``; the cores swap between pairs):
   - ours: ``scripts/train.py experiment=own_data trainer.time_limit=S`` and the four paths, nothing else but
     ``trainer.threads=1`` (the README's own-data command; ``recipe=auto`` does the rest);
   - the reference: ``tv_reference.py --seconds S`` (torchvision RetinaNet, ResNet-18 FPN, 320 px, AdamW 1e-3,
     from scratch; its docstring has the whole recipe);
   both budgets count training-loop wall time (start-up, the recipe's statistics and evaluation are not
   counted; they are in the wall column);
3. reads both results (COCO bbox AP with pycocotools on the same val JSON) and prints one row per side and
   the ratio of the APs; writes ``<out>/summary.json`` and ``<out>/summary.md``.

Run it alone on the machine: another CPU-heavy job on the same cores slows both sides, unevenly.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def convert(voc: Path, out: Path, eval_split: str, categories: str | None) -> dict[str, Path]:
    """COCO JSONs of the train split and the scored split, made by the project's own VOC converter."""
    files = {}
    for role, split in (("train", "train"), ("val", eval_split)):
        ids = voc / "ImageSets" / "Main" / f"{split}.txt"
        if not ids.exists():
            sys.exit(f"{ids} not found: --voc must be a Pascal VOC folder with ImageSets/Main/{split}.txt")
        target = out / f"{split}.json"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_to_coco.py"), "--format", "voc",
                        "--input", str(voc / "Annotations"), "--images", str(voc / "JPEGImages"),
                        "--ids", str(ids), "--output", str(target)], check=True, stdout=subprocess.DEVNULL)
        if categories:
            subset = out / f"{split}_{categories.replace(',', '_')}.json"
            subprocess.run([sys.executable, str(HERE / "make_subset.py"), "--input", str(target),
                            "--output", str(subset), "--categories", categories], check=True)
            target = subset
        files[role] = target
    return files


def commands(files: dict[str, Path], images: Path, seconds: float, run_dir: Path, ours_extra: list[str]):
    ours = [sys.executable, str(ROOT / "scripts" / "train.py"), "experiment=own_data", f"trainer.time_limit={seconds:g}",
            f"data.train_ann={files['train']}", f"data.train_images={images}",
            f"data.val_ann={files['val']}", f"data.val_images={images}",
            "trainer.threads=1", "trainer.progress=false", f"hydra.run.dir={run_dir / 'ours'}", *ours_extra]
    ref = [sys.executable, str(HERE / "tv_reference.py"), "--train-ann", str(files["train"]),
           "--train-images", str(images), "--val-ann", str(files["val"]), "--val-images", str(images),
           "--seconds", f"{seconds:g}", "--out", str(run_dir / "tv")]
    return {"ours": ours, "tv": ref}


def run_pair(cmds: dict[str, list[str]], run_dir: Path, cores: dict[str, int]) -> dict[str, float]:
    """Both commands at once, each on its core with one thread; their wall seconds."""
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "NO_ALBUMENTATIONS_UPDATE": "1"}
    procs, started, wall = {}, {}, {}
    for side, cmd in cmds.items():
        (run_dir / f"{side}.cmd").write_text(" ".join(cmd) + "\n")
        log = open(run_dir / f"{side}.log", "w")
        procs[side] = subprocess.Popen(["taskset", "-c", str(cores[side]), *cmd], stdout=log,
                                       stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        started[side] = time.perf_counter()
    for side, proc in procs.items():
        proc.wait()
        wall[side] = time.perf_counter() - started[side]
        if proc.returncode != 0:
            sys.exit(f"{side} failed (rc {proc.returncode}): see {run_dir / (side + '.log')}")
    return wall


def ours_result(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "ours" / "metrics.json").read_text())
    final = metrics.get("final_ema") or metrics["final"]  # the numbers the run printed (EMA weights if any)
    history = metrics["history"]
    seconds = sum(e["train"]["seconds"] for e in history)
    images = sum(e["train"]["images"] for e in history)
    return {"AP": final["stats"]["AP"], "AP50": final["stats"]["AP50"], "images": images,
            "train_seconds": seconds, "images_per_s": images / max(seconds, 1e-9)}


def tv_result(run_dir: Path) -> dict:
    s = json.loads((run_dir / "tv" / "summary.json").read_text())
    return {k: s[k] for k in ("AP", "AP50", "images", "images_per_s")} | {"train_seconds": s["train_seconds"]}


def table(rows: list[dict]) -> str:
    lines = ["| pair | side | core | images trained | images/s | AP | AP50 | wall s | AP ours / tv |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['pair']} | {r['side']} | {r['core']} | {r['images']:,} | {r['images_per_s']:.2f} | "
                     f"{r['AP']:.3f} | {r['AP50']:.3f} | {r['wall_s']:.0f} | {r.get('ratio', '')} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--voc", default=str(ROOT.parent / "shared" / "datasets" / "bccd"),
                   help="Pascal VOC folder (Annotations, JPEGImages, ImageSets/Main)")
    p.add_argument("--seconds", type=float, default=600.0, help="training budget of each side (wall seconds)")
    p.add_argument("--runs", type=int, default=1, help="pairs to run, one after the other (cores swap)")
    p.add_argument("--categories", default=None, help="keep these classes only (names, comma separated)")
    p.add_argument("--eval-split", default="val", choices=("val", "test"), help="the split that is scored")
    p.add_argument("--out", default=None, help="output folder (default outputs/bench_real/<time>)")
    p.add_argument("--data-dir", default=str(ROOT / "data"), help="where the converted JSON go (<data-dir>/<dataset>/)")
    p.add_argument("ours_overrides", nargs="*", help="extra overrides of our side (default: none, as the README)")
    args = p.parse_args(argv)

    voc = Path(args.voc).resolve()
    out = Path(args.out or ROOT / "outputs" / "bench_real" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    files = convert(voc, Path(args.data_dir) / voc.name, args.eval_split, args.categories)
    rows = []
    for i in range(args.runs):
        run_dir = out / f"pair{i + 1}"
        cores = {"ours": i % 2, "tv": 1 - i % 2}
        print(f"pair {i + 1} of {args.runs}: ours on core {cores['ours']}, torchvision on core {cores['tv']}, "
              f"{args.seconds:g} s of training each (logs: {run_dir})", flush=True)
        wall = run_pair(commands(files, voc / "JPEGImages", args.seconds, run_dir, args.ours_overrides), run_dir, cores)
        results = {"ours": ours_result(run_dir), "tv": tv_result(run_dir)}
        for side in ("ours", "tv"):
            rows.append({"pair": i + 1, "side": side, "core": cores[side], "wall_s": wall[side], **results[side]})
        tv_ap = results["tv"]["AP"]
        rows[-2]["ratio"] = f"{results['ours']['AP'] / tv_ap:.2f}" if tv_ap else "n/a (tv AP 0)"
        print(table(rows[-2:]), flush=True)
    ours_ap = sum(r["AP"] for r in rows if r["side"] == "ours") / args.runs
    tv_ap = sum(r["AP"] for r in rows if r["side"] == "tv") / args.runs
    summary = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu_name(),
               "dataset": str(voc.name), "categories": args.categories, "eval_split": args.eval_split,
               "seconds": args.seconds, "rows": rows, "mean_AP": {"ours": ours_ap, "tv": tv_ap},
               "ratio_of_means": ours_ap / tv_ap if tv_ap else None, "ours_overrides": args.ours_overrides}
    text = (f"{summary['date']}, {summary['cpu']}, {voc.name}"
            f"{' (' + args.categories + ' only)' if args.categories else ''}, scored on {args.eval_split}, "
            f"{args.seconds:g} s of training per side\n\n{table(rows)}\n\nmean AP: ours {ours_ap:.3f}, "
            f"torchvision {tv_ap:.3f}, ratio {f'{ours_ap / tv_ap:.2f}' if tv_ap else 'n/a'}\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(text)
    print("\n" + text + f"\nwrote {out / 'summary.md'}")
    return summary


if __name__ == "__main__":
    main()
