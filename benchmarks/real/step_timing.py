"""Images/s of bare training steps (forward + loss + backward + AdamW step, no data loading) of our model
and of the torchvision reference model at the same resize, on one thread, on 8 real images.

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/real/step_timing.py --size 320 [override ...]

Extra arguments are Hydra overrides of our training config (e.g. model.net.head_depth=4). The torchvision
model resizes inside its forward (counted, as in its real loop); ours gets batches already resized by the
data pipeline (its resize happens in the loader, not counted here).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def time_steps(step, n: int, warm: int = 3) -> float:
    for _ in range(warm):
        step()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=320)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--ann", default="data/bccd/train.json", help="COCO JSON (make bench-real writes this one)")
    p.add_argument("--images", default="../shared/datasets/bccd/JPEGImages")
    args, overrides = p.parse_known_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from retinanet.data.build import build_dataset, build_loader
    from retinanet.engine import TrainStep

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", ["experiment=own_data", f"data.train_ann={args.ann}", f"data.train_images={args.images}",
                                f"data.val_ann={args.ann}", f"data.val_images={args.images}",
                                f"data.min_size={args.size}", f"data.max_size={args.size}", "data.size_divisible=32",
                                "model=retinanet_r18_cpu", "model.anchors.scale=1", *overrides])
    ds = build_dataset(cfg.data, "train", train=True)
    batch = next(iter(build_loader(ds, 8, True, 0, cfg.data.size_divisible, 0, False)))
    anchors = instantiate(cfg.model.anchors)
    model = instantiate(cfg.model.net, num_classes=ds.num_classes, num_anchors=anchors.num_anchors_per_location)
    criterion = instantiate(cfg.loss, num_classes=ds.num_classes)
    channels_last = bool(cfg.trainer.channels_last)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train_step = TrainStep(model, criterion, anchors, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                           torch.device("cpu"), channels_last=channels_last)  # what the trainer runs every step
    model.train()

    def ours_step():
        train_step([batch], step=0, epoch=1)

    import tv_reference as tv
    tv_set = tv.CocoBoxes(args.ann, args.images, train=True)
    items = [tv_set[i] for i in range(8)]
    tv_model = tv.build_model(len(tv_set.cat_ids), args.size).train()
    tv_opt = torch.optim.AdamW(tv_model.parameters(), lr=1e-4)

    def tv_step():
        loss = sum(tv_model([it[0] for it in items], [it[1] for it in items]).values())
        tv_opt.zero_grad()
        loss.backward()
        tv_opt.step()

    t_ours = time_steps(ours_step, args.steps)
    t_tv = time_steps(tv_step, args.steps)
    print(f"size {args.size}: ours {8 / t_ours:.2f} images/s (batch {tuple(batch.images.shape)}, "
          f"channels_last={channels_last}), torchvision {8 / t_tv:.2f} images/s; overrides {overrides}")


if __name__ == "__main__":
    main()
