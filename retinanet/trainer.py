"""Training: compose the parts from a config, then the epoch loop (train, evaluate, checkpoint).

``run(cfg, out_dir)`` is what ``retinanet-train`` calls; tests call it too with a config from
Hydra's compose API. It returns the final validation AP (the value Hydra sweepers optimise; the
EMA weights' AP when ``trainer.ema.decay`` is set).

Under ``torchrun`` every rank runs this same function: DDP model, sharded batches, sharded
evaluation gathered on rank 0; rank 0 alone logs, writes TensorBoard, metrics and checkpoints.
The step itself is ``retinanet.engine``, evaluation ``retinanet.evaluation``, the device and
precision ``retinanet.runtime``, the time budget ``retinanet.budget``, checkpoints and resume
``retinanet.resume``.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from retinanet import distributed, recipe
from retinanet.budget import TimeBudget, train_seconds
from retinanet.checkpoint import Checkpointer, TrainState, keep_epoch_copy, resume_path
from retinanet.config import build, validate_train_config
from retinanet.data.build import build_dataset, build_loader
from retinanet.detector import Detector
from retinanet.ema import ModelEma
from retinanet.engine import TERMS, EpochProgress, StepResult, TrainStep, train_one_epoch
from retinanet.errors import ConfigError
from retinanet.evaluation import evaluate, format_metrics
from retinanet.files import atomic_write_json, remove_stale_temps
from retinanet.model.init import init_from
from retinanet.optim import set_total_steps, total_steps_of
from retinanet.report import plots, provenance
from retinanet.report.tensorboard import log_eval_visuals, log_hparams
from retinanet.runtime import precision_setup, process_settings, resolve_device
from retinanet.signals import StopSignal

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclasses.dataclass
class Parts:
    """Everything a run is made of, composed once from the config."""

    train_set: object
    val_set: object
    train_loader: object
    val_loader: object
    model: torch.nn.Module          # unwrapped (no DDP)
    criterion: torch.nn.Module
    ema: ModelEma | None
    train_step: TrainStep
    detector: Detector              # validation: the model being trained, at the evaluation resize
    checkpointer: Checkpointer
    steps_per_epoch: int
    accumulate: int
    evaluations: dict = dataclasses.field(default_factory=dict)  # the latest Evaluation per key (val, val_ema)


def run(cfg: DictConfig, out_dir: str | Path) -> float:
    """Train, evaluate and checkpoint as configured. Returns the final validation AP.

    A SIGTERM or Ctrl-C saves ``last.pt`` and exits (``SystemExit(128 + signal)``); resume with
    ``trainer.resume=auto``.
    """
    validate_train_config(cfg, allow_auto=True)
    distributed.init_from_env()
    distributed.quiet_other_ranks()
    stop = StopSignal().install()
    try:
        with process_settings(cfg.trainer.threads, cfg.trainer.deterministic):
            return _train(cfg, Path(distributed.broadcast_object(str(out_dir))), stop)
    finally:
        stop.restore()


def compose(cfg: DictConfig, resolved: dict, out_dir: Path, device: torch.device) -> Parts:
    """Datasets, loaders, model, loss, optimiser, schedule, EMA, the training step, the validation detector and the
    checkpointer of a run."""
    dist = distributed.info()
    train_set = build_dataset(cfg.data, "train", train=True)
    val_set = build_dataset(cfg.data, "val", train=False)
    if train_set.label_to_cat_id != val_set.label_to_cat_id:
        raise ConfigError(f"train and val categories differ: {train_set.ann_file} has {train_set.label_to_cat_id}, "
                          f"{val_set.ann_file} has {val_set.label_to_cat_id}")
    t = cfg.trainer
    pin, shards, accumulate = device.type == "cuda", dict(num_replicas=dist.world_size, rank=dist.rank), \
        t.accumulate_grad_batches
    train_loader = build_loader(train_set, t.batch_size, True, t.num_workers, cfg.data.size_divisible, cfg.seed, pin,
                                batches_multiple_of=accumulate, aspect_grouping=t.aspect_ratio_grouping, **shards)
    val_loader = build_loader(val_set, t.eval_batch_size, False, t.num_workers, cfg.data.size_divisible, cfg.seed,
                              pin, **shards)
    if len(train_loader) < accumulate:
        raise ConfigError(f"trainer.accumulate_grad_batches={accumulate} is more than the "
                          f"{train_loader.batch_sampler.full_batches} batches of {t.batch_size} images per epoch of "
                          f"each of {dist.world_size} process(es)")
    log.info("data: %d train / %d val images, %d classes: %s", len(train_set), len(val_set), train_set.num_classes,
             ", ".join(train_set.class_names))

    anchors = build(cfg.model.anchors)
    model = build(cfg.model.net, num_classes=train_set.num_classes, num_anchors=anchors.num_anchors_per_location)
    if cfg.model.get("init_from"):
        init_from(model, cfg.model.init_from)
    model.to(device)
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    if t.sync_bn and device.type != "cuda":
        raise ConfigError("trainer.sync_bn=true needs CUDA (torch's SyncBatchNorm runs on GPUs only); on CPU use "
                          "model.net.norm=gn or frozen_bn, whose results do not depend on the batch split")
    ema = ModelEma(model, t.ema.decay) if t.ema.decay else None
    criterion = build(cfg.loss, num_classes=train_set.num_classes, class_counts=train_set.class_counts()).to(device)
    global_batch = t.batch_size * dist.world_size * accumulate
    optimizer = build(cfg.optim, model=model, global_batch=global_batch)
    steps_per_epoch = len(train_loader) // accumulate
    scheduler = build(cfg.schedule, optimizer=optimizer, total_steps=steps_per_epoch * (t.epochs or 1))
    autocast_dtype, scaler = precision_setup(str(t.precision), device)
    log.info("model %s: %.2fM parameters, batches of %d images (%d per process x %d process(es) x %d accumulated) "
             "on %s", cfg.model.name, sum(p.numel() for p in model.parameters()) / 1e6, global_batch, t.batch_size,
             dist.world_size, accumulate, device)
    log.info("loss: %s", criterion.describe() if hasattr(criterion, "describe") else type(criterion).__name__)
    train_model = distributed.wrap_model(model, device, t.sync_bn)
    if t.compile:  # the training forward / backward only; evaluation runs the plain model (few, varied shapes)
        log.info("trainer.compile=true: torch.compile (inductor) of the training model; the first steps compile")
        train_model = torch.compile(train_model)
    train_step = TrainStep(train_model, criterion, anchors, optimizer,
                           scheduler, device, autocast_dtype=autocast_dtype, scaler=scaler, grad_clip=t.grad_clip,
                           ema=ema, channels_last=t.channels_last, max_bad_steps=t.max_bad_steps,
                           bad_batch_dir=out_dir)
    label_map = {"class_names": list(train_set.class_names), "category_ids": [int(c) for c in train_set.label_to_cat_id]}
    detector = Detector.from_config(resolved, label_map, device, model=model)
    checkpointer = Checkpointer(
        out_dir, model, optimizer, scheduler, scaler, ema, config=resolved, label_map=label_map,
        sampler_key={"world_size": dist.world_size, "batch_size": t.batch_size, "accumulate": accumulate,
                     "batches_per_epoch": len(train_loader), "seed": cfg.seed, "train_images": len(train_set)})
    return Parts(train_set, val_set, train_loader, val_loader, model, criterion, ema, train_step, detector,
                 checkpointer, steps_per_epoch, accumulate)


def generate_data(cfg: DictConfig) -> None:
    """A generated dataset (``data.generate``, e.g. the embedded shapes) on disk: rank 0 first, the others then
    find it ready."""
    if cfg.data.generate is None:
        return
    if distributed.info().is_main:
        build(cfg.data.generate)
    distributed.barrier()
    if not distributed.info().is_main:
        build(cfg.data.generate)


def _train(cfg: DictConfig, out_dir: Path, stop: StopSignal) -> float:
    dist = distributed.info()
    device = resolve_device(cfg.device)
    generate_data(cfg)
    recipe.apply(cfg, device)  # recipe=auto: the `auto` values fitted to the training set
    validate_train_config(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out_dir)
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))
    seed_everything(cfg.seed)
    parts = compose(cfg, resolved, out_dir, device)
    if dist.is_main:  # versions, git commit, annotation files: in every checkpoint and the model card
        parts.checkpointer.provenance = provenance.collect(cfg.data.name, parts.train_set, parts.val_set)
    path = distributed.broadcast_object(resume_path(cfg.trainer.resume, out_dir) if dist.is_main else None)
    state = parts.checkpointer.load(path) if path is not None else TrainState()
    budget = None
    if cfg.trainer.time_limit:
        asked = cfg.trainer.epochs * parts.steps_per_epoch if cfg.trainer.epochs else None
        budget = TimeBudget(cfg.trainer.time_limit, asked)
        log.info("trainer.time_limit=%gs of training: %s", cfg.trainer.time_limit,
                 "the run plans as many steps as fit, from its pace" if budget.fills else
                 f"at most {cfg.trainer.epochs} epochs; fewer steps if they would not fit, from the pace")
    set_total_steps(parts.train_step.scheduler, planned_steps(cfg, state, parts.steps_per_epoch))
    writer = None
    if dist.is_main:
        from torch.utils.tensorboard import SummaryWriter  # imported late: slow import

        writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=state.step + 1 if state.step else None)
        writer = plots.RecordingWriter(writer, state.curves)  # the per-step curves of plots/loss_lr.png
    try:
        train_epochs(cfg, state, parts, budget, stop, writer)
        evaluated = [e for e in state.history if "val" in e]
        if writer is not None and evaluated:  # the HParams tab: this run's settings with its final numbers
            log_hparams(writer, cfg, evaluated[-1].get("val_ema") or evaluated[-1]["val"], step=state.step)
    finally:
        if writer is not None:
            writer.close()
        parts.train_loader.shutdown()  # the worker processes end with the run
        parts.val_loader.shutdown()
    return finish(cfg, state, out_dir, parts.val_set, budget, parts.evaluations)


def planned_steps(cfg: DictConfig, state: TrainState, steps_per_epoch: int) -> int:
    """The run's total steps: what a time limit planned (kept in checkpoints), else ``trainer.epochs`` worth."""
    if state.planned_steps is not None and cfg.trainer.time_limit:
        return state.planned_steps
    return (cfg.trainer.epochs or 1) * steps_per_epoch


def train_epochs(cfg: DictConfig, state: TrainState, parts: Parts, budget: TimeBudget | None, stop: StopSignal,
                 writer) -> None:
    """The epoch loop from ``state`` on, until the planned steps are trained: train, evaluate, checkpoint;
    exits (checkpoint saved) on a signal."""
    t, scheduler, checkpointer = cfg.trainer, parts.train_step.scheduler, parts.checkpointer
    spent_before = train_seconds(state.history)
    if budget is not None:
        budget.reset_clock(spent_before + state.progress.seconds)

    def on_step(result: StepResult, progress: EpochProgress) -> bool:
        state.step = result.step
        if writer is not None and result.step % t.log_every == 0:
            for k in TERMS:
                writer.add_scalar(f"train/{k}", result.terms[k], result.step)
            writer.add_scalar("train/lr", result.lr, result.step)
            writer.add_scalar("train/num_pos_per_image", result.num_pos / max(1, result.images), result.step)
            writer.add_scalar("train/grad_norm", result.grad_norm, result.step)
        total = total_steps_of(scheduler)
        if budget is not None:
            spent = spent_before + progress.seconds
            budget.record(spent)
            new_total = distributed.broadcast_object(
                result.step if budget.exhausted(spent) else budget.total_steps(result.step, spent, total))
            if new_total != total:
                set_total_steps(scheduler, new_total)
                state.planned_steps = total = new_total
        every = t.checkpoint_every_steps
        if every and result.step % every == 0 and progress.batches < len(parts.train_loader) and result.step < total:
            state.progress = progress
            checkpointer.save(state, epoch_complete=False)
        return result.step >= total

    while state.step < total_steps_of(scheduler):
        epoch = state.epoch
        parts.train_loader.batch_sampler.set_epoch(epoch, skip=state.progress.batches)
        stats = train_one_epoch(parts.train_step, parts.train_loader, epoch=epoch, step=state.step,
                                accumulate=parts.accumulate, progress=state.progress, bad_steps=state.bad_steps,
                                on_step=on_step, stop_requested=stop.requested,
                                show_progress=t.progress and distributed.info().is_main)
        state.step, state.bad_steps = stats["step"], stats["bad_steps"]
        if stats["interrupted"]:
            checkpointer.save(state, epoch_complete=False)
            log.warning("stopped by a signal at step %d (epoch %d, %d of %d batches): saved %s; continue with "
                        "trainer.resume=auto (same run dir) or trainer.resume=%s", state.step, epoch,
                        state.progress.batches, len(parts.train_loader), checkpointer.last, checkpointer.last)
            raise SystemExit(stop.exit_code())
        spent_before += stats["seconds"]
        total = total_steps_of(scheduler)
        last = state.step >= total
        log.info("epoch %d%s: loss %.4f (cls %.4f, box %.4f), %.1f images/s, step %d of %d", epoch,
                 " (the last)" if last else "", stats.get("loss", float("nan")), stats.get("loss_cls", float("nan")),
                 stats.get("loss_box", float("nan")), stats["images_per_s"], state.step, total)
        entry = {"epoch": epoch, "step": state.step, "train": stats, "bad_steps": state.bad_steps}
        if last or (t.eval_every and epoch % t.eval_every == 0):
            evaluate_epoch(entry, parts, writer, t.progress, cfg.evaluation.backend)
        state.history.append(entry)
        ap = final_ap(entry)
        improved = ap is not None and ap > state.best_ap
        if improved:
            state.best_ap = ap
        state.progress = EpochProgress()
        checkpointer.save(state, epoch_complete=True, metrics=entry.get("val_ema") or entry.get("val"))
        state.epoch = epoch + 1
        if improved:
            checkpointer.mark_best()
        if distributed.info().is_main:
            keep_epoch_copy(checkpointer.last, epoch, t.keep_last)
            atomic_write_json({"history": state.history}, checkpointer.out_dir / "metrics.json")
        if budget is not None:
            budget.reset_clock(spent_before)
        if distributed.any_rank(stop.requested()):
            log.warning("stopped by a signal after epoch %d: saved %s", epoch, checkpointer.last)
            raise SystemExit(stop.exit_code())


def final_ap(entry: dict) -> float | None:
    """The AP an epoch is judged by: of the EMA weights when there are any."""
    val = entry.get("val_ema") or entry.get("val")
    return None if val is None or val["stats"]["AP"] is None else float(val["stats"]["AP"])


def evaluate_epoch(entry: dict, parts: Parts, writer, progress: bool, backend: str = "pycocotools") -> None:
    """Evaluate the weights (and the EMA weights) into ``entry``; curves and pictures to TensorBoard."""
    nets = [("val", parts.detector)]
    if parts.ema is not None:
        nets.append(("val_ema", parts.detector.with_model(parts.ema.module)))
    for key, detector in nets:
        result = evaluate(detector, parts.val_loader, parts.val_set, parts.criterion,
                          progress=progress and distributed.info().is_main, desc=key, backend=backend)
        entry[key] = result.metrics
        parts.evaluations[key] = result
        if writer is not None:
            for name, value in {**result.metrics["stats"], **result.metrics["loss"]}.items():
                if value is not None:
                    writer.add_scalar(f"{key}/{name}", value, entry["step"])
            log_eval_visuals(writer, entry["step"], parts.val_set, result.detections, result.image_ids,
                             result.metrics, result.precision, prefix=key)
        stats = result.metrics["stats"]
        log.info("epoch %d: %s AP %s AP50 %s", entry["epoch"], "val" if key == "val" else "val (EMA weights)",
                 _fmt(stats["AP"]), _fmt(stats["AP50"]))


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def finish(cfg: DictConfig, state: TrainState, out_dir: Path, val_set, budget: TimeBudget | None,
           evaluations: dict | None = None) -> float:
    """Final metrics.json, printed summary and pictures (rank 0; ``evaluations``: the last ``Evaluation`` per key,
    for the pictures); returns the final AP on every rank."""
    evaluated = [e for e in state.history if "val" in e]
    if not evaluated:
        raise ConfigError(f"trainer.resume: the run in {out_dir} has already trained all its steps but holds no "
                          "evaluation; raise trainer.epochs to train on")
    last = evaluated[-1]
    metrics = last.get("val_ema") or last["val"]
    images = sum(e["train"]["images"] for e in state.history)
    seconds = train_seconds(state.history)
    throughput = images / max(seconds, 1e-9)
    dist = distributed.info()
    if dist.is_main:
        summary = {"history": state.history, "final": last["val"], "final_ema": last.get("val_ema"),
                   "train_images_per_s": throughput, "train_seconds": seconds, "world_size": dist.world_size,
                   "bad_steps": state.bad_steps, "resumed_from": state.resumed_from, "steps": state.step,
                   "epochs_planned": cfg.trainer.epochs, "epochs_trained": len(state.history),
                   "time_limit": cfg.trainer.time_limit}
        atomic_write_json(summary, out_dir / "metrics.json")
        names = dict(zip(val_set.label_to_cat_id, val_set.class_names))
        which = " (EMA weights)" if "val_ema" in last else ""
        print(f"\nCOCO evaluation{which} on {cfg.data.name} val ({len(val_set)} images):\n"
              + format_metrics(metrics, names))
        print(f"\ntraining throughput: {throughput:.1f} images/s ({images:.0f} images in {seconds:.0f} s, "
              f"{state.step} steps, {len(state.history)} epochs)")
        if budget is not None:
            asked = f"of the {cfg.trainer.epochs} epochs asked for" if cfg.trainer.epochs else "planned from the pace"
            print(f"trainer.time_limit={cfg.trainer.time_limit:g}s: trained {seconds:.0f} s "
                  f"({seconds / cfg.trainer.time_limit:.1%} of the budget), {state.step} steps {asked}")
        if cfg.evaluation.plots.enabled:
            p = cfg.evaluation.plots
            final = (evaluations or {}).get("val_ema" if "val_ema" in last else "val")
            plots.write_run_plots(out_dir / "plots", state.history, state.curves, final, val_set, p.score_thresh,
                                  p.iou_thresh, p.num_images)
        print(f"outputs: {out_dir}")
    ap = metrics["stats"]["AP"]
    return float(ap) if ap is not None else float("nan")
