"""Item 6 and 7 of `make bench`: how close the train step comes to this machine's convolution peak, and where its
time goes.

- ``conv_peak``: one large 3x3 convolution (256 -> 256 channels, batch 8, 64 x 64), forward + backward (input and
  weight gradients: 3x the forward FLOPs), in fp32 and bf16, NCHW and channels_last, all in the same rounds.
  Where the CPU has no native bf16 (``retinanet.runtime.native_bf16``: AVX512-BF16 or AMX) bf16 is emulated
  and two orders of magnitude slower; it is then measured at batch 1, 16 x 16 (its rate does not depend on the
  size there; the full size would take minutes per call) and labelled "emulated".
- ``achieved``: FLOPs of one train step (``torch.utils.flop_counter.FlopCounterMode``: convolutions and matrix
  products, forward and backward) over its measured time, as a fraction of the peak of the same precision (the
  better layout). bf16 is ``TrainStep`` under bf16 autocast (``trainer.precision=bf16-mixed``). Emulated, the
  R50 bf16 step at 2x256x256 takes about a minute, so the bf16 steps are then measured at a smaller input
  (``SIZES[...]["flops_bf16_emulated"]``), in rounds with an fp32 step of that size (in the JSON).
- ``split``: self CPU time of the train step's operators (``torch.profiler``), grouped into families by
  operator name and by the scope they run in: the loss (the criterion's forward, and the backward of the
  operators it ran, found by their autograd sequence numbers), the optimiser (``Optimizer.step`` /
  ``zero_grad``), data loading (the main process getting the next batch from the trainer's DataLoader, as a
  training step does), convolutions, normalisation (batch / group norm) and the rest.
"""

from __future__ import annotations

import collections
import statistics

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.timing import interleaved
from retinanet.runtime import native_bf16

PEAK = {"batch": 8, "size": 64, "channels": 256}
PEAK_EMULATED = {"batch": 1, "size": 16, "channels": 256}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FAMILIES = ("convolutions", "normalisation", "loss", "optimiser", "data loading", "other")


def conv_flops(batch: int, size: int, channels: int) -> float:
    """Forward + backward FLOPs of a 3x3 same-padded convolution: forward 2*N*C*C*9*H*W, backward twice that."""
    return 3 * 2.0 * batch * channels * channels * 9 * size * size


def _conv_case(dtype: torch.dtype, channels_last: bool, batch: int, size: int, channels: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(dtype)
    x = torch.randn(batch, channels, size, size, generator=gen).to(dtype)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    grad = torch.ones(batch, channels, size, size, dtype=dtype)
    if channels_last:
        grad = grad.contiguous(memory_format=torch.channels_last)

    def run():
        conv.zero_grad(set_to_none=True)
        x.grad = None
        conv(x).backward(grad)

    return run


def conv_peak(repeats: int = 3, warmup: int = 1, peak: dict | None = None, emulated: dict | None = None,
              runners: dict | None = None) -> dict:
    """GFLOP/s of the 3x3 convolution per precision and layout, measured in the same rounds; per precision the
    better layout is its ``peak_flop_s``. ``runners`` (a dict) receives per precision ``(fn, flops)`` of the
    better layout, for ``achieved`` to time the peak again in the same rounds as the train steps."""
    native = native_bf16(torch.device("cpu"))
    shapes = {"fp32": peak or PEAK, "bf16": (peak or PEAK) if native else (emulated or PEAK_EMULATED)}
    fns = {f"{p}_{layout}": _conv_case(DTYPES[p], layout == "channels_last", **shapes[p])
           for p in DTYPES for layout in ("nchw", "channels_last")}
    times = interleaved(fns, repeats, warmup)
    out = {"native_bf16": native}
    for p in DTYPES:
        flops = conv_flops(**shapes[p])
        rates = {layout: flops / times[f"{p}_{layout}"]["median_s"] for layout in ("nchw", "channels_last")}
        best = max(rates, key=rates.get)
        if runners is not None:
            runners[p] = (fns[f"{p}_{best}"], flops)
        out[p] = {"shape": shapes[p], "flops": flops, "flop_s": rates, "best_layout": best, "peak_flop_s": rates[best],
                  "times": {layout: times[f"{p}_{layout}"] for layout in rates},
                  "emulated": p == "bf16" and not native}
    return out


def count_flops(step) -> float:
    """FLOPs of one call of ``step`` (forward + backward; ``FlopCounterMode`` counts convolutions and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def achieved(state, peaks: dict, repeats: int = 3, warmup: int = 1, bf16_state=None) -> dict:
    """The train step of ``state`` (``benchmarks.train.State``) in fp32 and under bf16 autocast, channels_last, and
    the conv peak of each precision (``peaks``: ``conv_peak``'s ``runners``), all timed in the same rounds (a shared
    machine's load then hits step and peak alike): FLOPs, FLOP/s and ``fraction`` per precision, the median over
    rounds of step FLOP/s / peak FLOP/s. ``bf16_state``: time bf16 on this (smaller) state instead (emulated bf16
    at the full size takes minutes per step), with an fp32 step of its size (``fp32_small``) for comparison."""
    from benchmarks import train

    bf16_on = bf16_state if bf16_state is not None else state
    steps = {"fp32": state.step_ours, "bf16": train.ours_step_of(bf16_on, torch.bfloat16)}
    if bf16_state is not None:
        steps["fp32_small"] = bf16_state.step_ours
    flops = {"fp32": count_flops(state.step_ours)}
    flops["bf16"] = flops["fp32"] if bf16_state is None else count_flops(bf16_state.step_ours)
    if bf16_state is not None:
        flops["fp32_small"] = flops["bf16"]
    fns = {**steps, **{f"peak_{p}": fn for p, (fn, _) in peaks.items()}}
    times = interleaved(fns, repeats, warmup)
    fraction = {}
    for p in ("fp32", "bf16"):
        peak_flops = peaks[p][1]
        fraction[p] = statistics.median((flops[p] / a) / (peak_flops / c) for a, c in
                                        zip(times[p]["wall_s"], times[f"peak_{p}"]["wall_s"]))
    return {"flops": flops, "times": times, "fraction": fraction,
            "shape": {p: _shape(bf16_on if p != "fp32" else state) for p in steps},
            "flop_s": {p: flops[p] / times[p]["median_s"] for p in steps},
            "peak_flop_s": {p: peaks[p][1] / times[f"peak_{p}"]["median_s"] for p in peaks},
            "step_s": {p: times[p]["median_s"] for p in steps}}


def _shape(state) -> str:
    b, _, h, w = state.batch.images.shape
    return f"{b}x{h}x{w}"


class _Scoped(torch.nn.Module):
    """The criterion, its forward inside a ``record_function("loss")`` scope (forwards ``assign`` and settings)."""

    def __init__(self, criterion):
        super().__init__()
        self.inner = criterion

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, *args, **kwargs):
        with record_function("loss"):
            return self.inner(*args, **kwargs)

    def assign(self, *args, **kwargs):  # the anchor matching, before the forward (``TrainStep._normalizer``)
        with record_function("loss"):
            return self.inner.assign(*args, **kwargs)


def scoped_criterion(criterion):
    return _Scoped(criterion)


def family_of_name(name: str) -> str:
    n = name.lower()
    if "conv" in n:
        return "convolutions"
    if any(k in n for k in ("batch_norm", "group_norm", "layer_norm", "batchnorm", "groupnorm", "layernorm")):
        return "normalisation"
    return "other"


def _scope(name: str) -> str | None:
    if name == "loss":
        return "loss"
    if name.startswith("Optimizer.step") or name.startswith("Optimizer.zero_grad"):
        return "optimiser"
    if name == "data loading":
        return "data loading"
    return None


def group_events(events) -> dict[str, float]:
    """Self CPU seconds per family of the profiler's ``events``: an operator belongs to the family of the nearest
    enclosing scope that names one (itself first): the loss / optimiser / data-loading scopes, the backward of an
    operator the loss ran (autograd sequence number), then a convolution or normalisation by name (its backward's
    layout copies included); else "other"."""
    events = list(events)

    def loss_scoped(e):
        while e is not None:
            if e.name == "loss":
                return True
            e = e.cpu_parent
        return False

    loss_seq = {e.sequence_nr for e in events if e.sequence_nr >= 0 and not e.name.startswith("autograd::")
                and loss_scoped(e)}
    memo: dict[int, str] = {}

    def family(e):
        key = id(e)
        if key not in memo:
            fam = _scope(e.name)
            if fam is None and e.name.startswith("autograd::engine::evaluate_function") and e.sequence_nr in loss_seq:
                fam = "loss"
            if fam is None and family_of_name(e.name) != "other":
                fam = family_of_name(e.name)
            if fam is None:
                fam = family(e.cpu_parent) if e.cpu_parent is not None else "other"
            memo[key] = fam
        return memo[key]

    totals = collections.Counter({f: 0.0 for f in FAMILIES})
    for e in events:
        totals[family(e)] += e.self_cpu_time_total / 1e6
    return dict(totals)


def split(step, steps: int = 2, next_batch=None) -> dict:
    """Self CPU seconds per family of ``steps`` calls of ``step`` (after a warm-up call), each after
    ``next_batch()`` (in a "data loading" scope) when given; returns per-step seconds and shares."""
    def one():
        if next_batch is not None:
            with record_function("data loading"):
                next_batch()
        step()

    one()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            one()
    totals = group_events(prof.events())
    total = sum(totals.values())
    return {"seconds_per_step": total / steps, "family_seconds": {k: v / steps for k, v in totals.items()},
            "shares": {k: v / total if total > 0 else 0.0 for k, v in totals.items()}, "steps": steps}


def loader_batches(root, batch_size: int, num_workers: int | None = None):
    """``next_batch`` for ``split``: batches of the trainer's DataLoader on the shapes data (item 5's loader)."""
    from benchmarks.data import data_config
    from retinanet.config import load_preset
    from retinanet.data.build import build_dataset, build_loader

    trainer = load_preset("trainer", "default")
    workers = int(trainer.num_workers if num_workers is None else num_workers)
    cfg = data_config(root)
    loader = build_loader(build_dataset(cfg, "train", train=True), batch_size, True, workers, cfg.size_divisible,
                          0, False)
    state = {"it": iter(loader)}

    def next_batch():
        try:
            return next(state["it"])
        except StopIteration:
            state["it"] = iter(loader)
            return next(state["it"])

    next_batch.workers = workers
    return next_batch
