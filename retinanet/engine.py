"""One epoch of training and one pass of evaluation: plain functions, no hidden loop.

A training step: forward + loss (fp32, even under autocast) for each of ``ctx.accumulate``
micro-batches, backward of ``loss * ctx.loss_scale / ctx.accumulate`` (under DDP the gradient
all-reduce happens once, on the last micro-batch), then one optimiser step. The loss terms are
summed over ranks every micro-batch (one small all-reduce) so that every rank takes the same
decision on a non-finite loss or on a stop request (SIGTERM), and logs the global loss.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from retinanet.checkpoint import atomic_save
from retinanet.data.collate import Batch
from retinanet.distributed import unwrap
from retinanet.errors import UserError

log = logging.getLogger(__name__)
TERMS = ("loss", "loss_cls", "loss_box")


class NonFiniteLossError(UserError, RuntimeError):
    """The loss or the gradients became NaN or infinite; the message names the step, the terms and the images."""


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
    accumulate: int = 1                 # micro-batches per optimiser step
    loss_scale: float = 1.0             # backward of loss * loss_scale (world size for a batch-normalised loss)
    world_size: int = 1
    rank: int = 0
    ema: object | None = None           # retinanet.ema.ModelEma, updated after every optimiser step
    max_bad_steps: int = 0              # non-finite steps skipped before stopping
    bad_steps: int = 0                  # non-finite steps skipped so far (the trainer checkpoints it)
    bad_batch_dir: Path | None = None   # where the batch of a fatal non-finite step is saved
    stop_requested: Callable[[], bool] | None = None          # e.g. SIGTERM seen: stop after this step
    after_step: Callable[[int, "EpochProgress"], None] | None = None  # e.g. periodic checkpoints
    extra: dict = field(default_factory=dict)


@dataclass
class EpochProgress:
    """Position inside an epoch and its running sums: checkpointed mid-epoch, restored on resume."""

    batches: int = 0                    # micro-batches trained on in this epoch
    images: int = 0
    seconds: float = 0.0
    sums: dict = field(default_factory=dict)  # loss term -> sum over finite micro-batches (global values)
    counted: int = 0                    # finite micro-batches in ``sums``
    interrupted: bool = False

    def state_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "interrupted"}

    @classmethod
    def from_state(cls, state: dict | None) -> "EpochProgress":
        return cls(**(state or {}))


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


def _global_terms(losses: dict, ctx: StepContext, stop: bool) -> tuple[dict, bool]:
    """Loss terms of the global batch and the stop flag, identical on every rank."""
    local = torch.stack([losses[k].detach().float() * ctx.loss_scale for k in TERMS]
                        + [losses["num_pos"].detach().float(), torch.tensor(float(stop), device=ctx.device)])
    if ctx.world_size > 1:
        local = local.clone()
        torch.distributed.all_reduce(local)
        local[:len(TERMS)] /= ctx.world_size
    values = local.tolist()
    return dict(zip(TERMS + ("num_pos",), values[:-1])), values[-1] > 0


def _grad_norm(model: nn.Module) -> torch.Tensor:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


def _save_bad_batches(window: list, ctx: StepContext, step: int, epoch: int) -> Path | None:
    if ctx.bad_batch_dir is None:
        return None
    suffix = f"_rank{ctx.rank}" if ctx.world_size > 1 else ""
    path = Path(ctx.bad_batch_dir) / f"nonfinite_step{step:07d}{suffix}.pt"
    atomic_save({"step": step, "epoch": epoch, "rank": ctx.rank,
                 "batches": [{f.name: getattr(b, f.name).cpu() for f in fields(b)} for b, _ in window],
                 "loss_terms": [{k: float(v) for k, v in terms.items()} for _, terms in window]}, path)
    return path


def _bad_step(what: str, window: list, grad_norm: float, ctx: StepContext, step: int, epoch: int) -> None:
    """Count a non-finite step; raise ``NonFiniteLossError`` (batch saved) once more than allowed."""
    ctx.bad_steps += 1
    terms = "; ".join(", ".join(f"{k}={float(v):.4g}" for k, v in t.items()) for _, t in window)
    ids = [i for b, _ in window for i in b.image_ids.tolist()]
    where = f" on rank {ctx.rank}" if ctx.world_size > 1 else ""
    msg = f"non-finite {what} at step {step} (epoch {epoch}{where}): {terms}, grad_norm={grad_norm:.4g}; " \
          f"image ids in the batch: {ids}"
    if ctx.bad_steps <= ctx.max_bad_steps:
        log.warning("%s. Skipped that step (%d of trainer.max_bad_steps=%d).", msg, ctx.bad_steps, ctx.max_bad_steps)
        return
    path = _save_bad_batches(window, ctx, step, epoch)
    saved = f"; the batch is saved in {path}" if path else ""
    raise NonFiniteLossError(
        f"{msg}{saved}. Lower optim.lr, raise schedule.warmup_steps, set trainer.grad_clip, or set "
        f"trainer.max_bad_steps=K to skip up to K such steps (now {ctx.max_bad_steps})."
    )


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, scheduler, ctx: StepContext,
                    epoch: int, step: int, progress: EpochProgress | None = None) -> dict:
    """Train for one pass over ``loader`` (or what is left of it: ``progress`` of a resumed epoch).

    Returns mean loss terms, images/s, the new global step and ``interrupted`` (stopped early
    because ``ctx.stop_requested()`` said so on some rank).
    """
    progress = progress if progress is not None else EpochProgress()
    model.train()
    t0, seconds0 = time.perf_counter(), progress.seconds
    window: list[tuple[Batch, dict]] = []
    window_finite = True  # the global loss of every micro-batch of the window (the same on every rank)
    buffers = None
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not ctx.progress, dynamic_ncols=True,
               initial=progress.batches, total=len(loader))
    for batch in bar:
        batch = batch.to(ctx.device, non_blocking=True)
        last_micro = (progress.batches + 1) % ctx.accumulate == 0
        if ctx.max_bad_steps and not window:  # a skipped step must not keep its batch-norm statistics either
            buffers = [b.detach().clone() for b in model.buffers()]
        no_sync = model.no_sync() if not last_micro and hasattr(model, "no_sync") else contextlib.nullcontext()
        with no_sync:
            losses = forward_loss(model, batch, ctx)
            loss = losses["loss"] * (ctx.loss_scale / ctx.accumulate)
            (ctx.scaler.scale(loss) if ctx.scaler is not None else loss).backward()
        values, stop = _global_terms(losses, ctx, ctx.stop_requested() if ctx.stop_requested else False)
        window.append((batch, {k: float(losses[k].detach()) for k in TERMS}))
        progress.batches += 1
        progress.images += len(batch) * ctx.world_size
        if all(math.isfinite(values[k]) for k in TERMS):
            for k, v in values.items():
                progress.sums[k] = progress.sums.get(k, 0.0) + v
            progress.counted += 1
        else:
            window_finite = False
        if not last_micro:
            continue

        if ctx.scaler is not None:
            ctx.scaler.unscale_(optimizer)
        grad_norm = _grad_norm(model)
        loss_ok = window_finite
        grads_ok = ctx.scaler is not None or bool(torch.isfinite(grad_norm))  # the scaler skips inf grads itself
        if loss_ok and grads_ok:
            if ctx.grad_clip:
                torch.nn.utils.clip_grads_with_norm_(model.parameters(), ctx.grad_clip, grad_norm)
            if ctx.scaler is not None:
                ctx.scaler.step(optimizer)
                ctx.scaler.update()
            else:
                optimizer.step()
            if ctx.ema is not None:
                ctx.ema.update(unwrap(model))
        else:
            _bad_step("gradients" if loss_ok else "loss", window, float(grad_norm), ctx, step + 1, epoch)
            if ctx.scaler is not None:
                ctx.scaler.update()
            if buffers is not None:
                for b, saved in zip(model.buffers(), buffers):
                    b.copy_(saved)
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        window, window_finite = [], True
        progress.seconds = seconds0 + time.perf_counter() - t0
        if ctx.writer is not None and step % ctx.log_every == 0:
            for k in TERMS:
                ctx.writer.add_scalar(f"train/{k}", values[k], step)
            ctx.writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
            ctx.writer.add_scalar("train/num_pos_per_image", values["num_pos"] / max(1, len(batch) * ctx.world_size),
                                  step)
            ctx.writer.add_scalar("train/grad_norm", float(grad_norm), step)
        bar.set_postfix(loss=f"{values['loss']:.3f}", cls=f"{values['loss_cls']:.3f}",
                        box=f"{values['loss_box']:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        if ctx.after_step is not None:
            ctx.after_step(step, progress)
        if stop:
            progress.interrupted = True
            break
    progress.seconds = seconds0 + time.perf_counter() - t0
    means = {k: v / max(1, progress.counted) for k, v in progress.sums.items()}
    return {**means, "images": progress.images, "seconds": progress.seconds, "step": step,
            "images_per_s": progress.images / progress.seconds if progress.seconds > 0 else math.nan,
            "interrupted": progress.interrupted}


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
