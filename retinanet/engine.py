"""One epoch of training and one pass of evaluation: plain functions, no hidden loop."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from retinanet.data.collate import Batch


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step, the terms and the images."""


@dataclass
class StepContext:
    """What a training step needs besides the model: built once by the trainer."""

    criterion: nn.Module
    anchors: nn.Module | object
    device: torch.device
    channels_last: bool = False
    autocast_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    grad_clip: float | None = None
    log_every: int = 20
    writer: object | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)


def autocast(ctx: StepContext):
    if ctx.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=ctx.device.type, dtype=ctx.autocast_dtype)


def forward_loss(model: nn.Module, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
    """Model forward + anchors + loss for one batch already on the device."""
    images = batch.images
    if ctx.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(ctx):
        out = model(images)
    anchors = ctx.anchors(out.feature_shapes, tuple(images.shape[-2:]), ctx.device)
    # the loss runs in fp32 even under autocast
    return ctx.criterion(out.cls_logits.float(), out.box_deltas.float(), anchors,
                         batch.gt_boxes, batch.gt_labels, batch.gt_crowd)


def _check_finite(losses: dict, batch: Batch, step: int) -> None:
    if torch.isfinite(losses["loss"]):
        return
    terms = ", ".join(f"{k}={float(v):.4g}" for k, v in losses.items())
    ids = batch.image_ids.tolist()
    raise NonFiniteLossError(
        f"non-finite loss at step {step}: {terms}; image ids in the batch: {ids}. "
        "Lower optim.lr, raise schedule.warmup_steps, or set optim.grad_clip."
    )


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, scheduler, ctx: StepContext,
                    epoch: int, step: int) -> dict:
    """Train for one pass over ``loader``. Returns mean loss terms, images/s and the new global step."""
    model.train()
    sums: dict[str, float] = {}
    n_batches = n_images = 0
    t0 = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not ctx.progress, dynamic_ncols=True)
    for batch in bar:
        batch = batch.to(ctx.device, non_blocking=True)
        losses = forward_loss(model, batch, ctx)
        _check_finite(losses, batch, step)
        optimizer.zero_grad(set_to_none=True)
        if ctx.scaler is not None:
            ctx.scaler.scale(losses["loss"]).backward()
            ctx.scaler.unscale_(optimizer)
        else:
            losses["loss"].backward()
        grad_norm = None
        if ctx.grad_clip:
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), ctx.grad_clip)
        if ctx.scaler is not None:
            ctx.scaler.step(optimizer)
            ctx.scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        step += 1
        n_batches += 1
        n_images += batch.images.shape[0]
        values = {k: float(v.detach()) for k, v in losses.items()}
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        if ctx.writer is not None and step % ctx.log_every == 0:
            for k, v in values.items():
                ctx.writer.add_scalar(f"train/{k}", v, step)
            ctx.writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
            ctx.writer.add_scalar("train/num_pos_per_image", values["num_pos"] / batch.images.shape[0], step)
            if grad_norm is not None:
                ctx.writer.add_scalar("train/grad_norm", float(grad_norm), step)
        bar.set_postfix(loss=f"{values['loss']:.3f}", cls=f"{values['loss_cls']:.3f}",
                        box=f"{values['loss_box']:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    elapsed = time.perf_counter() - t0
    means = {k: v / max(1, n_batches) for k, v in sums.items()}
    return {**means, "images": n_images, "seconds": elapsed,
            "images_per_s": n_images / elapsed if elapsed > 0 else math.nan, "step": step}


@torch.no_grad()
def predict(model: nn.Module, loader, postprocess, ctx: StepContext, desc: str = "eval") -> tuple[list, list, dict]:
    """Detections (original image coordinates) for every image of ``loader``.

    Returns ``(detections, image_ids, mean validation losses)``; the losses are computed
    from the same forward pass, so they cost almost nothing.
    """
    model.eval()
    detections, image_ids = [], []
    sums: dict[str, float] = {}
    n = 0
    for batch in tqdm(loader, desc=desc, leave=False, disable=not ctx.progress, dynamic_ncols=True):
        batch = batch.to(ctx.device, non_blocking=True)
        images = batch.images
        if ctx.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(ctx):
            out = model(images)
        cls_logits, box_deltas = out.cls_logits.float(), out.box_deltas.float()
        anchors = ctx.anchors(out.feature_shapes, tuple(images.shape[-2:]), ctx.device)
        losses = ctx.criterion(cls_logits, box_deltas, anchors, batch.gt_boxes, batch.gt_labels, batch.gt_crowd)
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += 1
        per_level = ctx.anchors.num_anchors_per_level(out.feature_shapes)
        dets = postprocess(cls_logits, box_deltas, anchors, per_level, batch.image_sizes, batch.scales)
        detections.extend({k: v.cpu() for k, v in d.items()} for d in dets)
        image_ids.extend(batch.image_ids.tolist())
    return detections, image_ids, {k: v / max(1, n) for k, v in sums.items()}
