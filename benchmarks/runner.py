"""Runs the benchmark cases at a size preset and builds the table rows (see ``benchmarks/bench.py``)."""

from __future__ import annotations

import logging
import os
import platform
import time
from pathlib import Path

import torch
import torchvision

from benchmarks import data as data_case
from benchmarks import endtoend, inference, loss, postprocess, train
from benchmarks.memory import peak_memory
from benchmarks.report import mib, row, seconds
from benchmarks.timing import interleaved, round_ratio

log = logging.getLogger(__name__)

R50, R18 = "retinanet_r50", "retinanet_r18_cpu"
SIZES = {
    "full": {  # COCO scale for loss / postprocess; CPU-feasible model sizes
        "loss": {"height": 800, "width": 1216, "num_classes": 80, "boxes_per_image": 50, "images_with_boxes": 2,
                 "empty_images": 1},
        "postprocess": {"height": 800, "width": 1216, "num_classes": 80, "images": 3},
        "train_r50": {"preset": R50, "batch": 2, "height": 256, "width": 256, "optim": "sgd"},
        "train_r18": {"preset": R18, "batch": 16, "height": 160, "width": 160, "optim": "adamw"},
        "inference_r50": {"preset": R50, "batch": 2, "height": 256, "width": 256},
        "inference_r18": {"preset": R18, "batch": 16, "height": 160, "width": 160},
        "endtoend": {"images": 64, "batch_size": 8},
        "data": {"batches": 10},
        "repeats": {"loss": 5, "postprocess": 5, "train": 5, "inference": 7, "endtoend": 3},  # medians of paired rounds
        "warmup": 1,
    },
    "tiny": {  # seconds: for tests of the harness
        "loss": {"height": 128, "width": 192, "num_classes": 5, "boxes_per_image": 4, "images_with_boxes": 2,
                 "empty_images": 1},
        "postprocess": {"height": 128, "width": 192, "num_classes": 5, "images": 2},
        "train_r50": {"preset": R18, "batch": 1, "height": 64, "width": 64, "optim": "sgd", "num_classes": 3,
                      "nchw": False},
        "train_r18": {"preset": R18, "batch": 2, "height": 64, "width": 64, "optim": "adamw", "num_classes": 3},
        "inference_r50": {"preset": R18, "batch": 1, "height": 64, "width": 64, "num_classes": 3},
        "inference_r18": {"preset": R18, "batch": 2, "height": 64, "width": 64, "num_classes": 3},
        "endtoend": {"images": 4, "batch_size": 2},
        "data": {"batches": 1, "batch_size": 4, "num_workers": 0},
        "repeats": {"loss": 1, "postprocess": 1, "train": 1, "inference": 1, "endtoend": 1},
        "warmup": 0,
    },
}
CASES = ("loss", "postprocess", "train", "inference", "endtoend", "data", "flops")


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "loadavg_1min": os.getloadavg()[0]}


def _timed(module, params: dict, repeats: int, warmup: int, memory: bool, memory_params: dict | None = None) -> dict:
    """Agreement, interleaved times and (optionally) per-contender peak memory of one case."""
    state = module.setup(**params)
    result = {"params": params, "agreement": module.agreement(state)}
    result["times"] = interleaved(module.contenders(state), repeats, warmup)
    result["ratio"] = round_ratio(result["times"], "ours", "torchvision")
    result["ratio_cpu"] = round_ratio(result["times"], "ours", "torchvision", "cpu_s")
    result["_state"] = state
    if memory:
        threads = torch.get_num_threads()
        result["memory"] = {c: peak_memory(module.__name__.rsplit(".", 1)[1], c, memory_params or params, threads)
                            for c in ("ours", "torchvision")}
    return result


def _time_row(item: str, what: str, r: dict, target: float | None, ours: str = "ours") -> dict | None:
    t = r["times"]
    if ours not in t:
        return None
    ratio = r["ratio"] if ours == "ours" else round_ratio(t, ours, "torchvision")
    return row(item, what, seconds(t[ours]["median_s"]), seconds(t["torchvision"]["median_s"]), ratio,
               "-" if target is None else f"<= {target}x", None if target is None else ratio <= target)


def _memory_row(item: str, what: str, r: dict, target: float | None) -> dict | None:
    if "memory" not in r:
        return None
    a, b = r["memory"]["ours"]["peak_mib"], r["memory"]["torchvision"]["peak_mib"]
    ratio = a / b if b > 0 else float("nan")
    return row(item, what + ": peak memory", mib(a), mib(b), ratio, "-" if target is None else f"<= {target}x",
               None if target is None else ratio <= target)


def run(size: str, out_dir: Path, cases=CASES, memory: bool = True, data_root: Path | None = None) -> dict:
    """Run ``cases`` at ``SIZES[size]``; returns ``{"machine", "results", "rows"}`` (rows: the table).

    ``data_root``: a generated shapes dataset for items 4 and 5 (default ``data/shapes``, or a small one
    generated under ``out_dir``).
    """
    sizes, reps, warm = SIZES[size], SIZES[size]["repeats"], SIZES[size]["warmup"]
    results, rows = {}, []
    started = time.perf_counter()
    if "loss" in cases:
        log.info("1. loss + target assignment")
        r = results["loss"] = _timed(loss, sizes["loss"], reps["loss"], warm, memory)
        rows.append(_time_row("1", "matching + focal + box loss, fwd+bwd: time", r, 0.3))
        rows.append(_memory_row("1", "matching + focal + box loss, fwd+bwd", r, 0.3))
    if "postprocess" in cases:
        log.info("2. postprocess")
        r = results["postprocess"] = _timed(postprocess, sizes["postprocess"], reps["postprocess"], warm, memory)
        rows.append(_time_row("2", "decode + top-k + NMS: time", r, 0.5))
        rows.append(_memory_row("2", "decode + top-k + NMS", r, None))
    if "train" in cases or "flops" in cases or "data" in cases:
        for key, label in (("train_r50", "R50 paper preset"), ("train_r18", "CPU demo preset")):
            if key == "train_r18" and "train" not in cases and "data" not in cases:
                continue
            if key == "train_r50" and "train" not in cases and "flops" not in cases:
                continue
            log.info("3. train step, %s", label)
            p = sizes[key]
            params = {**p, "conv_peak": key == "train_r50" and "flops" in cases}
            mem_params = {**p, "nchw": False, "conv_peak": False}
            r = results[key] = _timed(train, params, reps["train"], warm, memory and "train" in cases, mem_params)
            what = f"train step {label} ({p['batch']}x{p['height']}x{p['width']})"
            if "train" in cases:
                rows.append(_time_row("3", what + ", channels_last: time", r, 0.9))
                rows.append(_time_row("3", what + ", NCHW: time", r, None, ours="ours_nchw"))
                rows.append(_memory_row("3", what, r, None))
    if "inference" in cases:
        for key, label in (("inference_r50", "R50 paper preset"), ("inference_r18", "CPU demo preset")):
            log.info("4. inference, %s", label)
            p = sizes[key]
            r = results[key] = _timed(inference, p, reps["inference"], warm, False)
            rows.append(_time_row("4", f"inference {label} ({p['batch']}x{p['height']}x{p['width']}): model + "
                                       "postprocess time", r, 0.9))
    root = None
    if "endtoend" in cases or "data" in cases:
        root = Path(data_root) if data_root else data_case.shapes_root(out_dir / "shapes")
    if "endtoend" in cases:
        log.info("4. end-to-end folder inference")
        r = results["endtoend"] = endtoend.run(out_dir / "endtoend", root, repeats=reps["endtoend"],
                                               **sizes["endtoend"])
        rows.append(row("4", f"scripts/infer.py on {r['images']} images, fraction of model-only throughput",
                        f"{r['end_to_end_images_per_s']:.1f} img/s", f"model only {r['model_only_images_per_s']:.1f} "
                        "img/s", r["fraction"], ">= 0.9", r["fraction"] >= 0.9))
    if "data" in cases:
        log.info("5. data pipeline")
        r = results["data"] = data_case.loader_images_per_s(root, **sizes["data"])
        step = results["train_r18"]
        consume = step["params"]["batch"] / step["times"]["ours"]["median_s"]
        r["train_step_images_per_s"] = consume
        ratio = r["images_per_s"] / consume
        rows.append(row("5", f"train DataLoader ({r['num_workers']} worker, full augmentation) vs CPU demo train step",
                        f"{r['images_per_s']:.1f} img/s", f"step uses {consume:.1f} img/s", ratio, ">= 2x",
                        ratio >= 2))
    if "flops" in cases:
        log.info("6. achieved FLOP/s")
        r = results["train_r50"]
        state = r["_state"]
        flops = train.train_flops(state)
        t = r["times"]
        per_round = [(flops / a) / (state.conv_flops / c) for a, c in zip(t["ours"]["wall_s"], t["conv3x3_peak"]["wall_s"])]
        fraction = sorted(per_round)[len(per_round) // 2]
        achieved = flops / t["ours"]["median_s"]
        peak = state.conv_flops / t["conv3x3_peak"]["median_s"]
        results["flops"] = {"train_step_flops": flops, "achieved_flop_s": achieved, "conv_peak_flop_s": peak,
                            "fraction": fraction, "conv_flops": state.conv_flops}
        rows.append(row("6", "R50 train step achieved FLOP/s vs large 3x3 conv peak",
                        f"{achieved / 1e9:.1f} GFLOP/s", f"conv peak {peak / 1e9:.1f} GFLOP/s", fraction, ">= 0.8",
                        fraction >= 0.8))
    for r in results.values():
        r.pop("_state", None)
    m = machine()
    m["seconds"] = time.perf_counter() - started
    return {"machine": m, "size": size, "results": results, "rows": [r for r in rows if r is not None]}
