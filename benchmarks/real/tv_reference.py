"""Reference trainer: a plain torchvision RetinaNet, as a user would write it from torchvision's docs.

Standalone (imports nothing from this project). ResNet-18 + FPN (64 channels, P3-P7 from layers 2-4 with
P6/P7 from P5: ``LastLevelP6P7(64, 64)``), torchvision's default RetinaNet anchors (32-512 px, 3 scales x
3 ratios) and head (4 conv layers, no norm), no pretrained weights, AdamW lr 1e-3 / weight decay 1e-4,
100-step linear warmup then constant lr, batch 8, longer side resized to 320 px inside the model
(``RetinaNet(min_size=320, max_size=320)``), random horizontal flip, gradient-norm clipping at 10, one
thread. Trains for a fixed budget of training-loop wall time (``--seconds``: it stops before the first step
that would end past the budget, estimated from the mean step time so far; evaluation is not counted;
``--clock cpu`` counts this process's CPU time instead of wall time, for machines shared with other work),
then writes COCO detections for the val set (``<out>/results.json``, the dataset's category ids) and
prints COCOeval bbox AP / AP50 and the number of images trained.

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/real/tv_reference.py \\
        --train-ann data/bccd/train.json --train-images ../shared/datasets/bccd/JPEGImages \\
        --val-ann data/bccd/val.json --val-images ../shared/datasets/bccd/JPEGImages \\
        --seconds 600 --out outputs/tv_ref

Labels: the dataset's categories sorted by id become labels 0..K-1 and ``num_classes=K`` (sigmoid
classifier, no background class). Images: PIL, ``convert("RGB")`` (PNGs named .jpg, RGBA and palette
images load too). ``--size`` changes the resize (min_size = max_size = size).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import numpy as np
import torch
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelP6P7


class CocoBoxes(torch.utils.data.Dataset):
    """COCO JSON + image folder -> (float image [3, H, W] in [0, 1], {"boxes": xyxy, "labels"}, image id)."""

    def __init__(self, ann_file: str, img_dir: str, train: bool):
        self.coco = COCO(ann_file)
        self.img_dir, self.train = img_dir, train
        self.ids = sorted(self.coco.imgs)
        self.cat_ids = sorted(self.coco.cats)
        self.label_of = {c: i for i, c in enumerate(self.cat_ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        img_id = self.ids[i]
        info = self.coco.imgs[img_id]
        image = Image.open(os.path.join(self.img_dir, info["file_name"])).convert("RGB")
        boxes, labels = [], []
        for a in self.coco.imgToAnns.get(img_id, []):
            if a.get("iscrowd", 0):
                continue
            x, y, w, h = a["bbox"]
            if w > 1 and h > 1:
                boxes.append([x, y, x + w, y + h])
                labels.append(self.label_of[a["category_id"]])
        image = TF.to_tensor(image)
        boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        if self.train and random.random() < 0.5:  # random horizontal flip
            image = image.flip(-1)
            width = image.shape[-1]
            boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
        return image, {"boxes": boxes, "labels": torch.tensor(labels, dtype=torch.int64)}, img_id


def collate(batch):
    return tuple(zip(*batch))


def build_model(num_classes: int, size: int) -> RetinaNet:
    body = torchvision.models.resnet18(weights=None)
    backbone = BackboneWithFPN(body, return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
                               in_channels_list=[128, 256, 512], out_channels=64,
                               extra_blocks=LastLevelP6P7(64, 64))
    return RetinaNet(backbone, num_classes=num_classes, min_size=size, max_size=size)


def train(model, loader, seconds: float, lr: float, warmup: int, clip: float, clock=time.perf_counter,
          log_every: int = 20):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    model.train()
    spent, steps, images = 0.0, 0, 0
    while True:
        t_fetch = clock()
        for images_b, targets, _ in loader:
            # the budget: stop before a step that would end past it (mean step time so far, loading included)
            if steps and spent + spent / steps > seconds:
                return steps, images, spent
            loss_dict = model(list(images_b), list(targets))
            loss = sum(loss_dict.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            sched.step()
            now = clock()
            spent += now - t_fetch
            t_fetch = now
            steps += 1
            images += len(images_b)
            if steps % log_every == 0:
                print(f"step {steps}: loss {loss.item():.3f} ({', '.join(f'{k} {v.item():.3f}' for k, v in loss_dict.items())}), "
                      f"{images / spent:.2f} images/s, {spent:.0f} s", flush=True)


@torch.no_grad()
def detect(model, dataset: CocoBoxes, batch_size: int = 8) -> list[dict]:
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    results = []
    for images_b, _, ids in loader:
        for out, img_id in zip(model(list(images_b)), ids):
            for box, score, label in zip(out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist()):
                x1, y1, x2, y2 = box
                results.append({"image_id": int(img_id), "category_id": dataset.cat_ids[label],
                                "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                                "score": round(score, 5)})
    return results


def coco_ap(coco_gt: COCO, results: list[dict]) -> tuple[float, float]:
    if not results:
        return 0.0, 0.0
    ev = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return float(ev.stats[0]), float(ev.stats[1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-ann", required=True)
    p.add_argument("--train-images", required=True)
    p.add_argument("--val-ann", required=True)
    p.add_argument("--val-images", required=True)
    p.add_argument("--seconds", type=float, default=600.0, help="training-loop wall-time budget")
    p.add_argument("--size", type=int, default=320, help="min_size = max_size of the model's resize")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--clip", type=float, default=10.0)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="what --seconds counts: wall time, or this process's CPU time (immune to other load)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/tv_reference")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    train_set = CocoBoxes(args.train_ann, args.train_images, train=True)
    val_set = CocoBoxes(args.val_ann, args.val_images, train=False)
    if train_set.cat_ids != val_set.cat_ids:
        sys.exit(f"train and val categories differ: {train_set.cat_ids} vs {val_set.cat_ids}")
    model = build_model(len(train_set.cat_ids), args.size)
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         collate_fn=collate, num_workers=0)
    t_wall = time.perf_counter()
    steps, images, spent = train(model, loader, args.seconds, args.lr, args.warmup, args.clip,
                                 time.process_time if args.clock == "cpu" else time.perf_counter)
    wall = time.perf_counter() - t_wall
    t0 = time.perf_counter()
    results = detect(model, val_set)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f)
    ap, ap50 = coco_ap(val_set.coco, results)
    summary = {"AP": ap, "AP50": ap50, "images": images, "steps": steps, "train_seconds": spent, "clock": args.clock,
               "train_wall_seconds": wall,
               "images_per_s": images / max(spent, 1e-9), "eval_seconds": time.perf_counter() - t0,
               "size": args.size, "lr": args.lr, "batch_size": args.batch_size}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\ntorchvision reference: AP {ap:.3f} AP50 {ap50:.3f}; {images} images trained in {spent:.0f} s "
          f"({summary['images_per_s']:.2f} images/s, {steps} steps; --clock {args.clock}, {wall:.0f} s of wall time)")
    return summary


if __name__ == "__main__":
    main()
