"""Build everything from a composed config and run training with evaluation and checkpoints.

``run(cfg, out_dir)`` is what ``scripts/train.py`` calls; tests call it too with a config
from Hydra's compose API. It returns the final validation AP (the value Hydra sweepers optimise).
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from retinanet.checkpoint import atomic_save, atomic_write_json
from retinanet.config import validate_train_config
from retinanet.data import CocoDetection
from retinanet.data.build import build_dataset, build_loader
from retinanet.engine import StepContext, predict, train_one_epoch
from retinanet.evaluation import coco_evaluate, format_metrics, to_coco_results

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available on this machine; use device=cpu")
    return device


def precision_setup(precision: str, device: torch.device):
    """Autocast dtype and GradScaler for ``trainer.precision``."""
    if precision == "32":
        return None, None
    if precision == "16-mixed":
        if device.type != "cuda":
            raise ValueError("trainer.precision=16-mixed needs CUDA; on CPU use bf16-mixed or 32")
        return torch.float16, torch.amp.GradScaler("cuda")
    if device.type == "cpu":
        log.info("bf16 autocast on CPU (loss computed in fp32)")
    return torch.bfloat16, None


def label_map(dataset: CocoDetection) -> dict:
    return {"class_names": list(dataset.class_names), "category_ids": [int(c) for c in dataset.label_to_cat_id]}


def run(cfg: DictConfig, out_dir: str | Path) -> float:
    """Train, evaluate and checkpoint as configured. Returns the final validation AP."""
    validate_train_config(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))
    seed_everything(cfg.seed)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    device = resolve_device(str(cfg.device))

    if cfg.data.generate is not None:
        instantiate(cfg.data.generate)
    train_set = build_dataset(cfg.data, "train", train=True)
    val_set = build_dataset(cfg.data, "val", train=False)
    if train_set.label_to_cat_id != val_set.label_to_cat_id:
        raise ValueError(f"train and val categories differ: {train_set.label_to_cat_id} vs {val_set.label_to_cat_id}")
    num_classes = train_set.num_classes
    pin = device.type == "cuda"
    train_loader = build_loader(train_set, cfg.trainer.batch_size, True, cfg.trainer.num_workers,
                                cfg.data.size_divisible, cfg.seed, pin)
    val_loader = build_loader(val_set, cfg.trainer.eval_batch_size, False, cfg.trainer.num_workers,
                              cfg.data.size_divisible, cfg.seed, pin)
    log.info("data: %d train / %d val images, %d classes: %s", len(train_set), len(val_set), num_classes,
             ", ".join(train_set.class_names))

    anchors = instantiate(cfg.model.anchors)
    model = instantiate(cfg.model.net, num_classes=num_classes, num_anchors=anchors.num_anchors_per_location)
    model.to(device)
    if cfg.trainer.channels_last:
        model.to(memory_format=torch.channels_last)
    criterion = instantiate(cfg.loss, num_classes=num_classes, **alpha_override(cfg, train_set))
    postprocess = instantiate(cfg.postprocess)
    optimizer = instantiate(cfg.optim, model=model)
    total_steps = cfg.trainer.epochs * len(train_loader)
    scheduler = instantiate(cfg.schedule, optimizer=optimizer, total_steps=total_steps)
    autocast_dtype, scaler = precision_setup(str(cfg.trainer.precision), device)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s: %.2fM parameters, %d steps of batch %d on %s", cfg.model.name, n_params / 1e6,
             total_steps, cfg.trainer.batch_size, device)

    from torch.utils.tensorboard import SummaryWriter  # imported late: slow import

    writer = SummaryWriter(str(out_dir / "tensorboard"))
    ctx = StepContext(criterion=criterion, anchors=anchors, device=device, channels_last=cfg.trainer.channels_last,
                      autocast_dtype=autocast_dtype, scaler=scaler, grad_clip=cfg.trainer.grad_clip,
                      log_every=cfg.trainer.log_every, writer=writer, progress=cfg.trainer.progress)
    history, best_ap, step = [], -1.0, 0
    train_images = train_seconds = 0.0
    metrics = None
    for epoch in range(1, cfg.trainer.epochs + 1):
        stats = train_one_epoch(model, train_loader, optimizer, scheduler, ctx, epoch, step)
        step = stats["step"]
        train_images += stats["images"]
        train_seconds += stats["seconds"]
        log.info("epoch %d/%d: loss %.4f (cls %.4f, box %.4f), %.1f images/s", epoch, cfg.trainer.epochs,
                 stats["loss"], stats["loss_cls"], stats["loss_box"], stats["images_per_s"])
        entry = {"epoch": epoch, "step": step, "train": stats}
        last = epoch == cfg.trainer.epochs
        if last or (cfg.trainer.eval_every and epoch % cfg.trainer.eval_every == 0):
            metrics = evaluate_split(model, val_loader, postprocess, ctx, val_set)
            entry["val"] = metrics
            for name, value in metrics["stats"].items():
                writer.add_scalar(f"val/{name}", value, step)
            for name, value in metrics["loss"].items():
                writer.add_scalar(f"val/{name}", value, step)
            log.info("epoch %d: val AP %.3f AP50 %.3f", epoch, metrics["stats"]["AP"], metrics["stats"]["AP50"])
        history.append(entry)
        ckpt = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "epoch": epoch, "step": step, "config": resolved, "label_map": label_map(train_set),
            "metrics": entry.get("val"),
        }
        atomic_save(ckpt, out_dir / "last.pt")
        if "val" in entry and entry["val"]["stats"]["AP"] > best_ap:
            best_ap = entry["val"]["stats"]["AP"]
            atomic_save(ckpt, out_dir / "best.pt")
        atomic_write_json({"history": history}, out_dir / "metrics.json")
    writer.flush()
    writer.close()
    throughput = train_images / max(train_seconds, 1e-9)
    summary = {"history": history, "final": metrics, "train_images_per_s": throughput}
    atomic_write_json(summary, out_dir / "metrics.json")
    names = dict(zip(val_set.label_to_cat_id, val_set.class_names))
    print(f"\nCOCO evaluation on {cfg.data.name} val ({len(val_set)} images):\n" + format_metrics(metrics, names))
    print(f"\ntraining throughput: {throughput:.1f} images/s ({train_images:.0f} images in {train_seconds:.0f} s)")
    print(f"outputs: {out_dir}")
    return float(metrics["stats"]["AP"])


def alpha_override(cfg: DictConfig, train_set: CocoDetection) -> dict:
    """``loss.alpha=auto``: per-class alpha from training-set class frequencies (see losses.alpha_from_counts)."""
    if cfg.loss.alpha != "auto":
        return {}
    from retinanet.losses import alpha_from_counts

    alpha = alpha_from_counts(train_set.class_counts())
    log.info("loss.alpha=auto -> %s", [round(float(a), 3) for a in alpha])
    return {"alpha": alpha}


def evaluate_split(model, loader, postprocess, ctx: StepContext, dataset: CocoDetection) -> dict:
    """Detections on ``loader`` -> COCO numbers, per-class AP and mean validation losses."""
    t0 = time.perf_counter()
    detections, image_ids, losses = predict(model, loader, postprocess, ctx)
    results = to_coco_results(detections, image_ids, dataset.label_to_cat_id)
    metrics = coco_evaluate(dataset.coco, results, image_ids)
    metrics["loss"] = losses
    metrics["seconds"] = time.perf_counter() - t0
    return metrics
