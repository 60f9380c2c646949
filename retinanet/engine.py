"""Training steps and epochs: ``TrainStep`` takes one optimiser step, ``train_one_epoch`` loops over a loader.

A step: the micro-batches of one optimiser step (``trainer.accumulate_grad_batches`` of them) are
matched to their anchors first, so that the loss can be divided by the positive anchors of the
*whole* step (every micro-batch, every rank: one small all-reduce) when ``loss.normalization=batch``;
then forward + loss (fp32, even under autocast) + backward for each micro-batch (under DDP the
gradient all-reduce happens once, on the last one), clipping, the optimiser and scheduler step and
the EMA update. The loss terms, positives, images and the stop flag are summed over ranks once per
step (one all-reduce, read back by name), so every rank takes the same decision on a non-finite loss
or a stop request (SIGTERM) and logs the global loss. Each step returns a ``StepResult``.

An epoch: ``train_one_epoch`` advances the run's ``TrainState`` step by step (its step, bad steps and
position in the epoch), gives the per-step scalars to the run's loggers, asks the run's plan
(``retinanet.budget.RunPlan``) after every step whether the run's steps are done, writes the mid-epoch
checkpoints, and returns an ``EpochResult``: the epoch's metrics (what ``metrics.json`` records) and
why it ended (``EpochEnd``).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from retinanet import distributed
from retinanet.budget import RunPlan, train_seconds
from retinanet.data.collate import Batch
from retinanet.errors import UserError
from retinanet.files import atomic_save
from retinanet.runtime import autocast

log = logging.getLogger(__name__)
TERMS = ("loss", "loss_cls", "loss_box")


class NonFiniteLossError(UserError, RuntimeError):
    """The loss or the gradients became NaN or infinite; the message names the step, the terms and the images."""


@dataclass
class StepResult:
    """What one optimiser step did (identical on every rank)."""

    step: int                      # the global step count after this step
    terms: dict[str, float]        # loss terms of the global batch (every micro-batch, every rank)
    num_pos: float                 # positive anchors of the global batch
    images: int                    # images of the global batch
    grad_norm: float
    lr: float                      # the learning rate this step used
    skipped: bool = False          # non-finite: weights, optimiser and norm statistics left untouched
    stop: bool = False             # some rank asked to stop after this step (a signal)


class EpochEnd(enum.Enum):
    """Why an epoch ended."""

    COMPLETE = "the loader ran out"
    PLANNED = "the run trained its planned steps"
    STOPPED = "a signal asked the run to stop"


@dataclass
class EpochResult:
    """What ``train_one_epoch`` did: the epoch's metrics and why it ended."""

    metrics: dict                  # mean loss terms, images, seconds, images/s: the epoch's "train" in metrics.json
    end: EpochEnd


@dataclass
class EpochProgress:
    """Position inside an epoch and its running sums: checkpointed mid-epoch, restored on resume."""

    batches: int = 0                    # micro-batches trained on in this epoch
    images: int = 0
    seconds: float = 0.0
    sums: dict = field(default_factory=dict)  # loss term -> sum over the finite steps (global values)
    counted: int = 0                    # finite steps in ``sums``

    def state_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state(cls, state: dict | None) -> "EpochProgress":
        state = {k: v for k, v in (state or {}).items() if k in {f.name for f in fields(cls)}}
        return cls(**state)

    def count(self, result: StepResult, seconds: float) -> None:
        """Add one step: its images and (when it was not skipped) its loss terms; ``seconds``: the epoch's so far."""
        self.images += result.images
        self.seconds = seconds
        if not result.skipped:
            for k, v in result.terms.items():
                self.sums[k] = self.sums.get(k, 0.0) + v
            self.counted += 1

    def metrics(self) -> dict:
        """The epoch's mean loss terms (finite steps), images, seconds and images/s."""
        means = {k: v / max(1, self.counted) for k, v in self.sums.items()}
        return {**means, "images": self.images, "seconds": self.seconds,
                "images_per_s": self.images / self.seconds if self.seconds > 0 else math.nan}


class TrainStep:
    """One optimiser step over a list of ``accumulate`` micro-batches (see the module docstring).

    ``model`` may be wrapped in DDP; ``ema`` (``retinanet.ema.ModelEma``) is updated after every step;
    ``max_bad_steps`` non-finite steps are skipped over the whole run before one stops it
    (``NonFiniteLossError``, the batch saved under ``bad_batch_dir``).
    """

    def __init__(self, model: nn.Module, criterion: nn.Module, anchors, optimizer: torch.optim.Optimizer,
                 scheduler, device: torch.device, *, accumulate: int = 1, autocast_dtype: torch.dtype | None = None,
                 scaler: torch.amp.GradScaler | None = None, grad_clip: float | None = None, ema=None,
                 channels_last: bool = False, max_bad_steps: int = 0, bad_batch_dir: Path | None = None):
        if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
            raise ValueError(f"accumulate={accumulate!r} must be an integer >= 1")
        self.model, self.criterion, self.anchors = model, criterion, anchors
        self.optimizer, self.scheduler, self.device, self.accumulate = optimizer, scheduler, device, accumulate
        self.autocast_dtype, self.scaler, self.grad_clip, self.ema = autocast_dtype, scaler, grad_clip, ema
        self.channels_last, self.max_bad_steps, self.bad_batch_dir = channels_last, max_bad_steps, bad_batch_dir
        dist = distributed.info()
        self.world_size, self.rank = dist.world_size, dist.rank
        self.batch_normalised = getattr(criterion, "normalization", "batch") == "batch"

    def forward_loss(self, batch: Batch, targets=None, normalizer: torch.Tensor | None = None) -> dict:
        """Model forward + loss for one micro-batch already on the device (the loss in fp32)."""
        images = batch.images
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.autocast_dtype):
            out = self.model(images)
        anchors = self.anchors(out.feature_shapes, tuple(images.shape[-2:]), self.device)
        extra = {} if targets is None else {"targets": targets, "normalizer": normalizer}
        return self.criterion(out.cls_logits.float(), out.box_deltas.float(), anchors,
                              batch.gt_boxes, batch.gt_labels, batch.gt_crowd, **extra)

    def _normalizer(self, batches: list[Batch]) -> tuple[list, torch.Tensor | None]:
        """Targets of every micro-batch and the positives of the global batch (``loss.normalization=batch``)."""
        if not self.batch_normalised or not hasattr(self.criterion, "assign"):
            return [None] * len(batches), None
        targets = [self.criterion.assign(self.anchors.for_image(b.images.shape[-2:], self.device), b.gt_boxes,
                                         b.gt_labels, b.gt_crowd) for b in batches]
        local = torch.stack([t.num_pos.sum() for t in targets]).sum()
        return targets, distributed.all_reduce_sum(local).clamp(min=1.0)

    def __call__(self, batches: list[Batch], step: int, epoch: int, bad_steps: int = 0,
                 stop: bool = False) -> StepResult:
        """Train on ``batches`` (the micro-batches of step ``step + 1``); ``bad_steps``: non-finite steps the
        run already skipped; ``stop``: this rank was asked to stop (the result says whether any rank was)."""
        batches = [b.to(self.device, non_blocking=True) for b in batches]
        targets, normalizer = self._normalizer(batches)
        saved_buffers = [b.detach().clone() for b in self.model.buffers()] if self.max_bad_steps else None
        local, window = self._backward(batches, targets, normalizer)
        total = _sum_over_ranks({**local, "stop": self._scalar(float(stop))})
        divide = 1.0 if normalizer is not None else self.world_size * len(batches)
        terms = {k: total[k] / divide for k in TERMS}
        lr = self.optimizer.param_groups[0]["lr"]
        grad_norm, skipped = self._update(terms, window, step + 1, epoch, bad_steps, saved_buffers)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return StepResult(step=step + 1, terms=terms, num_pos=total["num_pos"], images=int(total["images"]),
                          grad_norm=grad_norm, lr=lr, skipped=skipped, stop=total["stop"] > 0)

    def _scalar(self, value: float) -> torch.Tensor:
        return torch.tensor(value, dtype=torch.float64, device=self.device)

    def _backward(self, batches: list[Batch], targets: list, normalizer: torch.Tensor | None) -> tuple[dict, list]:
        """Forward, loss and backward of each micro-batch: this rank's sums of the loss terms, positives and images
        (float64), and the window of (micro-batch, its loss terms) a bad step reports."""
        # normalised by the global positives, the micro-batch losses add up to the step's loss; DDP averages the
        # gradients over ranks, hence x world size. Per-image normalisation averages the micro-batches instead.
        scale = self.world_size if normalizer is not None else 1.0 / len(batches)
        sums = {k: self._scalar(0.0) for k in (*TERMS, "num_pos", "images")}
        window = []
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            no_sync = self.model.no_sync() if not last and hasattr(self.model, "no_sync") else contextlib.nullcontext()
            with no_sync:
                losses = self.forward_loss(batch, targets[i], normalizer)
                loss = losses["loss"] * scale
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            for k in (*TERMS, "num_pos"):
                sums[k] += losses[k].detach().double()
            sums["images"] += float(len(batch))
            window.append((batch, {k: float(losses[k].detach()) for k in TERMS}))
        return sums, window

    def _update(self, terms: dict, window: list, step: int, epoch: int, bad_steps: int,
                saved_buffers: list | None) -> tuple[float, bool]:
        """Clip and apply the gradients (and update the EMA), or skip a non-finite step (``_bad_step``) with the
        batch-norm statistics put back; returns the gradient norm and whether the step was skipped."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = _grad_norm(self.model)
        loss_ok = all(math.isfinite(v) for v in terms.values())
        grads_ok = self.scaler is not None or bool(torch.isfinite(grad_norm))  # the scaler skips inf grads itself
        if loss_ok and grads_ok:
            if self.grad_clip:
                torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), self.grad_clip, grad_norm)
            stepped = True
            if self.scaler is not None:
                scale = self.scaler.get_scale()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                stepped = self.scaler.get_scale() >= scale  # the scaler lowers its scale when it skipped the step
            else:
                self.optimizer.step()
            if self.ema is not None and stepped:  # weights a skipped step left unchanged are no new average point
                self.ema.update(distributed.unwrap(self.model))
            return float(grad_norm), False
        self._bad_step("gradients" if loss_ok else "loss", window, float(grad_norm), step, epoch, bad_steps)
        if self.scaler is not None:
            self.scaler.update()
        for b, value in zip(self.model.buffers(), saved_buffers or []):
            b.copy_(value)  # a skipped step keeps no batch-norm statistics either
        return float(grad_norm), True

    def _bad_step(self, what: str, window: list, grad_norm: float, step: int, epoch: int, bad_steps: int) -> None:
        """A non-finite step: allowed (logged) while the run has skipped fewer than ``max_bad_steps``,
        else ``NonFiniteLossError`` with the batch saved."""
        terms = "; ".join(", ".join(f"{k}={v:.4g}" for k, v in t.items()) for _, t in window)
        ids = [i for b, _ in window for i in b.image_ids.tolist()]
        where = f" on rank {self.rank}" if self.world_size > 1 else ""
        msg = f"non-finite {what} at step {step} (epoch {epoch}{where}): {terms}, grad_norm={grad_norm:.4g}; " \
              f"image ids in the batch: {ids}"
        if bad_steps + 1 <= self.max_bad_steps:
            log.warning("%s. Skipped that step (%d of trainer.max_bad_steps=%d).", msg, bad_steps + 1,
                        self.max_bad_steps)
            return
        path = self._save_bad_batches(window, step, epoch)
        saved = f"; the batch is saved in {path}" if path else ""
        raise NonFiniteLossError(
            f"{msg}{saved}. Lower optim.lr, raise the schedule's warmup, set trainer.grad_clip, or set "
            f"trainer.max_bad_steps=K to skip up to K such steps (now {self.max_bad_steps}).")

    def _save_bad_batches(self, window: list, step: int, epoch: int) -> Path | None:
        if self.bad_batch_dir is None:
            return None
        suffix = f"_rank{self.rank}" if self.world_size > 1 else ""
        path = Path(self.bad_batch_dir) / f"nonfinite_step{step:07d}{suffix}.pt"
        atomic_save({"step": step, "epoch": epoch, "rank": self.rank,
                     "batches": [{f.name: getattr(b, f.name).cpu() for f in fields(b)} for b, _ in window],
                     "loss_terms": [dict(terms) for _, terms in window]}, path)
        return path


def _grad_norm(model: nn.Module) -> torch.Tensor:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())




def _sum_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each scalar of ``values`` summed over the ranks, by name (one all-reduce of them stacked)."""
    names = list(values)
    total = distributed.all_reduce_sum(torch.stack([values[k] for k in names])).tolist()
    return dict(zip(names, total))


def train_one_epoch(train_step: TrainStep, loader, state, plan: RunPlan | None = None, *, loggers=None,
                    log_every: int = 1, checkpointer=None, checkpoint_every: int = 0,
                    stop_requested: Callable[[], bool] | None = None, show_progress: bool = True,
                    progress_log=None) -> EpochResult:
    """Train epoch ``state.epoch`` over ``loader`` from where ``state`` (a ``TrainState``) stands: its
    ``progress`` says how many batches of the epoch a resumed run already trained.

    Every step advances ``state`` (``step``, ``bad_steps``, ``progress``, the plan); then the
    per-step scalars every ``log_every`` steps (``loggers``: rank 0's ``LoggerGroup``, else None), a progress
    line when ``progress_log`` (``retinanet.report.progress.ProgressLog``) says it is time, the plan
    (``plan.after_step``: are the run's steps done? ``plan=None``: the epoch runs to the loader's end) and
    ``last.pt`` every ``checkpoint_every`` steps inside the epoch (``checkpointer``). A stop request
    (``stop_requested()`` on any rank) ends the epoch after the step.
    """
    progress, epoch = state.progress, state.epoch
    train_step.model.train()
    t0, seconds0, seconds_before = time.perf_counter(), progress.seconds, train_seconds(state.history)
    window: list[Batch] = []
    with tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not show_progress, dynamic_ncols=True,
              initial=progress.batches, total=len(loader)) as bar:
        for batch in bar:
            window.append(batch)
            progress.batches += 1
            if progress.batches % train_step.accumulate:
                continue
            result = train_step(window, state.step, epoch, state.bad_steps,
                                stop_requested() if stop_requested else False)
            window = []
            state.step, state.bad_steps = result.step, state.bad_steps + int(result.skipped)
            progress.count(result, seconds0 + time.perf_counter() - t0)
            bar.set_postfix(loss=f"{result.terms['loss']:.3f}", cls=f"{result.terms['loss_cls']:.3f}",
                            box=f"{result.terms['loss_box']:.3f}", lr=f"{result.lr:.2e}")
            _log_step(loggers, result, epoch, log_every)
            if progress_log is not None:
                progress_log.after_step(result, epoch, seconds_before + progress.seconds)
            done = False
            if plan is not None:  # re-planned from the pace, the same on every rank
                done = plan.after_step(result.step, seconds_before + progress.seconds)
                state.planned_steps, state.budget = plan.planned_steps, plan.state_dict()
            if result.stop:
                return EpochResult(progress.metrics(), EpochEnd.STOPPED)
            if done:
                return EpochResult(progress.metrics(), EpochEnd.PLANNED)
            if checkpointer is not None and checkpoint_every and result.step % checkpoint_every == 0 \
                    and progress.batches < len(loader):
                checkpointer.save(state, epoch_complete=False)
    progress.seconds = seconds0 + time.perf_counter() - t0  # the loader ran out: its end counts too
    return EpochResult(progress.metrics(), EpochEnd.COMPLETE)


def _log_step(loggers, result: StepResult, epoch: int, log_every: int) -> None:
    """The step's scalars to the loggers, every ``log_every`` steps (rank 0: ``loggers`` is None elsewhere)."""
    if loggers is None or result.step % log_every:
        return
    scalars = {f"train/{k}": result.terms[k] for k in TERMS}
    scalars.update({"train/lr": result.lr, "train/num_pos_per_image": result.num_pos / max(1, result.images),
                    "train/grad_norm": result.grad_norm, "epoch": epoch})
    loggers.log_scalars(scalars, result.step)
