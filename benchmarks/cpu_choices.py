"""Two CPU choices for the demo preset's train step, measured side by side in one process (ratios, not times).

1. memory layout: ``channels_last`` vs contiguous NCHW (fp32), the whole train step;
2. AdamW implementation: the default (on CPU tensors: the per-parameter loop), ``foreach=True`` and
   ``fused=True``: the optimiser step alone on the preset's parameters and gradients, and the whole train step.

The preset as it trains (``configs/model/retinanet_r18_cpu.yaml``: two-layer GroupNorm subnets, its own loss)
at ``trainer`` batch 8 x 128 x 128 on random data. Rounds alternate their order; ratios are medians over rounds
of the two contenders' times in the same round.

Examples:
    taskset -c 1 python benchmarks/cpu_choices.py --threads 1 --rounds 5
"""

import argparse
import copy
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from benchmarks.models import config, make_batch  # noqa: E402
from benchmarks.timing import interleaved, round_ratio  # noqa: E402
from retinanet.engine import TrainStep  # noqa: E402
from retinanet.optim import param_groups  # noqa: E402

VARIANTS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def demo_model(num_classes: int = 3, seed: int = 0):
    cfg = config("model", "retinanet_r18_cpu")
    torch.manual_seed(seed)
    anchors = instantiate(cfg.anchors)
    model = instantiate(cfg.net, num_classes=num_classes, num_anchors=anchors.num_anchors_per_location)
    return model, anchors, instantiate(config("loss", "focal_cpu"), num_classes=num_classes)


def adamw(model, **impl):
    return torch.optim.AdamW(param_groups(model, 0.05, False), lr=0.003, **impl)


def step_fn(model, anchors, criterion, batch, channels_last: bool, **impl):
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = adamw(model, **impl)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    step = TrainStep(model, criterion, anchors, opt, sched, torch.device("cpu"), channels_last=channels_last)
    model.train()
    return lambda: step([batch], step=0, epoch=1)


def optimizer_only(model, **impl):
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = adamw(model, **impl)
    return opt.step


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON file to write")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, anchors, criterion = demo_model()
    batch = make_batch(args.batch, args.size, args.size, 3, 5)
    out = {"threads": torch.get_num_threads(), "batch": args.batch, "size": args.size, "rounds": args.rounds}

    t = interleaved({"nchw": step_fn(copy.deepcopy(model), anchors, criterion, batch, False),
                     "channels_last": step_fn(copy.deepcopy(model), anchors, criterion, batch, True)},
                    args.rounds, warmup=1)
    out["layout"] = {"times": t, "channels_last_over_nchw": round_ratio(t, "channels_last", "nchw")}
    print(f"train step fp32 {args.batch}x{args.size}x{args.size}: NCHW {t['nchw']['median_s'] * 1e3:.0f} ms, "
          f"channels_last {t['channels_last']['median_s'] * 1e3:.0f} ms, ratio channels_last / NCHW "
          f"{out['layout']['channels_last_over_nchw']:.3f}", flush=True)

    t = interleaved({k: optimizer_only(copy.deepcopy(model), **v) for k, v in VARIANTS.items()},
                    args.rounds * 4, warmup=2)
    out["adamw_step"] = {"times": t, **{f"{k}_over_loop": round_ratio(t, k, "loop") for k in ("foreach", "fused")}}
    print("AdamW step alone: " + ", ".join(f"{k} {t[k]['median_s'] * 1e3:.1f} ms" for k in VARIANTS)
          + f"; foreach / loop {out['adamw_step']['foreach_over_loop']:.3f}, fused / loop "
          f"{out['adamw_step']['fused_over_loop']:.3f}", flush=True)

    t = interleaved({k: step_fn(copy.deepcopy(model), anchors, criterion, batch, False, **v)
                     for k, v in VARIANTS.items()}, args.rounds, warmup=1)
    out["adamw_train_step"] = {"times": t, **{f"{k}_over_loop": round_ratio(t, k, "loop")
                                              for k in ("foreach", "fused")}}
    print("train step (NCHW) with AdamW: " + ", ".join(f"{k} {t[k]['median_s'] * 1e3:.0f} ms" for k in VARIANTS)
          + f"; foreach / loop {out['adamw_train_step']['foreach_over_loop']:.3f}, fused / loop "
          f"{out['adamw_train_step']['fused_over_loop']:.3f}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
