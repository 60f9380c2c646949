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
from benchmarks import demo_step, endtoend, flops, inference, loss, postprocess, train
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
        # the demo's own step: make train's batch, training size (data/shapes.yaml) and classes
        "train_demo": {"preset": R18, "batch": 8, "height": 128, "width": 128, "num_classes": 6},
        "inference_r50": {"preset": R50, "batch": 2, "height": 256, "width": 256},
        "inference_r18": {"preset": R18, "batch": 16, "height": 160, "width": 160},
        "endtoend": {"images": 64, "batch_size": 8},
        "data": {"batches": 10},
        "peak": flops.PEAK, "peak_emulated": flops.PEAK_EMULATED,  # 3x3 conv, fwd+bwd (item 6)
        "split": {"steps": 2, "num_workers": None},  # profiled demo steps (item 7); loader workers: trainer's
        # bf16 train steps where bf16 is emulated (item 6): at the sizes above one R50 step takes about a minute
        "flops_bf16_emulated": {"train_r50": {"batch": 1, "height": 64, "width": 64},
                                "train_r18": {"batch": 2, "height": 96, "width": 96}},
        "repeats": {"loss": 5, "postprocess": 5, "train": 5, "inference": 7, "endtoend": 3, "peak": 3, "flops": 3},
        "warmup": 1,
    },
    "tiny": {  # seconds: for tests of the harness
        "loss": {"height": 128, "width": 192, "num_classes": 5, "boxes_per_image": 4, "images_with_boxes": 2,
                 "empty_images": 1},
        "postprocess": {"height": 128, "width": 192, "num_classes": 5, "images": 2},
        "train_r50": {"preset": R18, "batch": 1, "height": 64, "width": 64, "optim": "sgd", "num_classes": 3,
                      "nchw": False},
        "train_r18": {"preset": R18, "batch": 2, "height": 64, "width": 64, "optim": "adamw", "num_classes": 3},
        "train_demo": {"preset": R18, "batch": 2, "height": 64, "width": 64, "num_classes": 3},
        "inference_r50": {"preset": R18, "batch": 1, "height": 64, "width": 64, "num_classes": 3},
        "inference_r18": {"preset": R18, "batch": 2, "height": 64, "width": 64, "num_classes": 3},
        "endtoend": {"images": 4, "batch_size": 2},
        "data": {"batches": 1, "batch_size": 4, "num_workers": 0},
        "peak": {"batch": 2, "size": 16, "channels": 64}, "peak_emulated": {"batch": 1, "size": 16, "channels": 64},
        "split": {"steps": 1, "num_workers": 0},
        "flops_bf16_emulated": {"train_r18": {"batch": 1, "height": 64, "width": 64}},  # both code paths
        "repeats": {"loss": 1, "postprocess": 1, "train": 1, "inference": 1, "endtoend": 1, "peak": 1, "flops": 1},
        "warmup": 0,
    },
}
SIZES["gpu"] = {  # --device cuda (scripts/gpu_check.sh): COCO-scale images for the models too, more rounds
    **SIZES["full"],
    "train_r50": {"preset": R50, "batch": 8, "height": 800, "width": 800, "optim": "sgd"},
    "train_r18": {"preset": R18, "batch": 32, "height": 512, "width": 512, "optim": "adamw"},
    "inference_r50": {"preset": R50, "batch": 8, "height": 800, "width": 800},
    "inference_r18": {"preset": R18, "batch": 32, "height": 512, "width": 512},
    "repeats": {**SIZES["full"]["repeats"], "loss": 10, "postprocess": 10, "train": 10, "inference": 10},
    "warmup": 3,
}
CASES = ("loss", "postprocess", "train", "inference", "endtoend", "data", "flops")
CUDA_CASES = ("loss", "postprocess", "train", "inference")  # --device cuda: ours vs torchvision on the GPU


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "loadavg_1min": os.getloadavg()[0]}


def _synced(fns: dict, device: str) -> dict:
    """On CUDA every call waits for its kernels (else the clock would stop at the launch)."""
    if not str(device).startswith("cuda"):
        return fns

    def wrap(fn):
        def call():
            out = fn()
            torch.cuda.synchronize()
            return out
        return call

    return {k: wrap(f) for k, f in fns.items()}


def _timed(module, params: dict, repeats: int, warmup: int, memory: bool, memory_params: dict | None = None,
           device: str = "cpu") -> dict:
    """Agreement, interleaved times and (optionally) per-contender peak memory of one case."""
    state = module.setup(**params) if device == "cpu" else module.setup(**params, device=device)
    result = {"params": params, "agreement": module.agreement(state)}
    result["times"] = interleaved(_synced(module.contenders(state), device), repeats, warmup)
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


def run(size: str, out_dir: Path, cases=CASES, memory: bool = True, data_root: Path | None = None,
        r50: bool = True, device: str = "cpu") -> dict:
    """Run ``cases`` at ``SIZES[size]``; returns ``{"machine", "results", "rows"}`` (rows: the table).

    ``data_root``: a generated shapes dataset for items 4, 5 and 7 (default ``data/shapes``, or a small one
    generated under ``out_dir``). ``r50=False`` skips the R50 preset's cases (train, inference, FLOP/s).
    ``device="cuda"``: the cases of ``CUDA_CASES`` on the GPU (no peak-memory subprocesses: they measure host RSS).
    """
    sizes, reps, warm = SIZES[size], SIZES[size]["repeats"], SIZES[size]["warmup"]
    if device != "cpu":
        skipped = [c for c in cases if c not in CUDA_CASES]
        if skipped:
            log.info("device=%s: skipping the CPU-only cases %s", device, skipped)
        cases, memory = [c for c in cases if c in CUDA_CASES], False
    results, rows = {}, []
    started = time.perf_counter()
    if "loss" in cases:
        log.info("1. loss + target assignment")
        r = results["loss"] = _timed(loss, sizes["loss"], reps["loss"], warm, memory, device=device)
        rows.append(_time_row("1", "matching + focal + box loss, fwd+bwd: time", r, 0.3))
        rows.append(_memory_row("1", "matching + focal + box loss, fwd+bwd", r, 0.3))
    if "postprocess" in cases:
        log.info("2. postprocess")
        r = results["postprocess"] = _timed(postprocess, sizes["postprocess"], reps["postprocess"], warm, memory,
                                           device=device)
        rows.append(_time_row("2", "decode + top-k + NMS: time", r, 0.5))
        rows.append(_memory_row("2", "decode + top-k + NMS", r, None))
    if "train" in cases or "flops" in cases or "data" in cases:
        for key, label in (("train_r50", "R50 paper preset"), ("train_r18", "CPU demo preset")):
            if key == "train_r50" and (not r50 or ("train" not in cases and "flops" not in cases)):
                continue
            log.info("3. train step, %s", label)
            p = sizes[key]
            mem_params = {**p, "nchw": False}
            r = results[key] = _timed(train, p, reps["train"], warm, memory and "train" in cases, mem_params, device)
            what = f"train step {label} ({p['batch']}x{p['height']}x{p['width']})"
            if "train" in cases:
                rows.append(_time_row("3", what + ", channels_last: time", r, 0.9))
                rows.append(_time_row("3", what + ", NCHW: time", r, None, ours="ours_nchw"))
                rows.append(_memory_row("3", what, r, None))
    if "train" in cases and device == "cpu":
        rows += _demo_rows(results, sizes["train_demo"], reps["train"], warm)
    if "inference" in cases:
        for key, label in (("inference_r50", "R50 paper preset"), ("inference_r18", "CPU demo preset")):
            if key == "inference_r50" and not r50:
                continue
            log.info("4. inference, %s", label)
            p = sizes[key]
            r = results[key] = _timed(inference, p, reps["inference"], warm, False, device=device)
            rows.append(_time_row("4", f"inference {label} ({p['batch']}x{p['height']}x{p['width']}): model + "
                                       "postprocess time", r, 0.9))
    root = None
    if "endtoend" in cases or "data" in cases or "flops" in cases:
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
        rows += _flops_rows(results, sizes, reps, warm, root, r50)
    for r in results.values():
        r.pop("_state", None)
    m = machine()
    m["device"] = device
    if device != "cpu":
        m["gpu"] = torch.cuda.get_device_name(torch.device(device))
    m["seconds"] = time.perf_counter() - started
    return {"machine": m, "size": size, "results": results, "rows": [r for r in rows if r is not None]}


def _demo_rows(results: dict, params: dict, repeats: int, warmup: int) -> list[dict]:
    """Item 3, the demo's own train step: ours / torchvision's per precision (bf16 where native) and layout."""
    log.info("3. train step of make train (CPU demo preset at its batch and size), fp32 / bf16, NCHW / channels_last")
    state = demo_step.setup(**params)
    r = results["train_demo"] = {"params": params, "agreement": demo_step.agreement(state),
                                 "precisions": state.precisions}
    times = r["times"] = interleaved(demo_step.contenders(state), repeats, warmup)
    rows = []
    for p in state.precisions:
        for layout in demo_step.LAYOUTS:
            ours, theirs = demo_step.key("ours", p, layout), demo_step.key("torchvision", p, layout)
            rows.append(row("3", f"train step of make train ({params['batch']}x{params['height']}x{params['width']}, "
                                 f"CPU demo preset as trained) {p} {layout}: time", seconds(times[ours]["median_s"]),
                            seconds(times[theirs]["median_s"]), round_ratio(times, ours, theirs), "-", None))
    return rows


def _gflops(value: float) -> str:
    return f"{value / 1e9:.1f} GFLOP/s" if value >= 1e8 else f"{value / 1e9:.3f} GFLOP/s"


def _flops_rows(results: dict, sizes: dict, reps: dict, warm: int, root: Path | None, r50: bool) -> list[dict]:
    """Items 6 (conv peak, achieved FLOP/s of the train steps) and 7 (the demo step's time split)."""
    rows = []
    log.info("6. 3x3 conv peak, fp32 and bf16, NCHW and channels_last")
    runners = {}
    peak = results["conv_peak"] = flops.conv_peak(reps["peak"], warm, sizes["peak"], sizes["peak_emulated"], runners)
    for p in ("fp32", "bf16"):
        r = peak[p]
        sh = r["shape"]
        emulated = " (emulated: no native bf16 on this CPU)" if r["emulated"] else ""
        rows.append(row("6", f"3x3 conv peak {p}{emulated}, {sh['channels']} ch, {sh['batch']}x{sh['size']}x"
                             f"{sh['size']}, fwd+bwd: NCHW vs channels_last (ratio: channels_last / NCHW)",
                        f"NCHW {_gflops(r['flop_s']['nchw'])}", f"channels_last {_gflops(r['flop_s']['channels_last'])}",
                        r["flop_s"]["channels_last"] / r["flop_s"]["nchw"], "-", None))
    achieved = results["achieved"] = {}
    for key, label in (("train_r50", "R50 paper preset"), ("train_r18", "CPU demo preset")):
        if key not in results:
            continue
        log.info("6. achieved FLOP/s, %s, fp32 and bf16", label)
        prm = results[key]["params"]
        small = sizes.get("flops_bf16_emulated", {}).get(key) if peak["bf16"]["emulated"] else None
        bf16_state = train.setup(**{**prm, **small, "nchw": False}) if small else None
        a = achieved[key] = flops.achieved(results[key]["_state"], runners, reps["flops"], warm, bf16_state)
        for p in ("fp32", "bf16"):
            fraction = a["fraction"][p]
            target = ">= 0.8" if key == "train_r50" and p == "fp32" else "-"
            emulated = " (emulated)" if peak[p]["emulated"] else ""
            rows.append(row("6", f"{label} train step ({a['shape'][p]}) {p}{emulated}: "
                                 f"achieved FLOP/s, fraction of the {p} conv peak",
                            _gflops(a["flop_s"][p]), f"peak {_gflops(a['peak_flop_s'][p])} (same rounds)", fraction, target,
                            fraction >= 0.8 if target != "-" else None))
    if "train_r50" in achieved:  # the summary the earlier versions of the JSON had
        a = achieved["train_r50"]
        results["flops"] = {"train_step_flops": a["flops"]["fp32"], "achieved_flop_s": a["flop_s"]["fp32"],
                            "conv_peak_flop_s": a["peak_flop_s"]["fp32"], "fraction": a["fraction"]["fp32"]}
    elif "train_r18" in achieved:
        a = achieved["train_r18"]
        results["flops"] = {"train_step_flops": a["flops"]["fp32"], "achieved_flop_s": a["flop_s"]["fp32"],
                            "conv_peak_flop_s": a["peak_flop_s"]["fp32"], "fraction": a["fraction"]["fp32"]}
    if "train_r18" in results:
        log.info("7. CPU demo train step: time split by operator family (torch.profiler)")
        state, prm = results["train_r18"]["_state"], results["train_r18"]["params"]
        next_batch = None
        if root is not None:
            next_batch = flops.loader_batches(root, prm["batch"], sizes["split"]["num_workers"])
        sp = results["split"] = {side: flops.split(step, sizes["split"]["steps"], next_batch)
                                 for side, step in (("ours", state.step_ours), ("torchvision", state.step_tv))}
        sp["loader_workers"] = None if next_batch is None else next_batch.workers
        for fam in flops.FAMILIES:
            o, t = sp["ours"], sp["torchvision"]
            rows.append(row("7", f"CPU demo train step ({prm['batch']}x{prm['height']}x{prm['width']}), self CPU time "
                                 f"share: {fam} (ratio: ours' share)",
                            f"{100 * o['shares'][fam]:.0f}% ({seconds(o['family_seconds'][fam])})",
                            f"{100 * t['shares'][fam]:.0f}% ({seconds(t['family_seconds'][fam])})",
                            o["shares"][fam], "-", None))
    return rows
