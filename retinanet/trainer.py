"""Training: compose the parts of a run from its config, then the epoch loop (train, evaluate, checkpoint).

Read top to bottom. ``fit(cfg, out_dir)`` prepares the run dir (``prepare``), composes the parts
(``compose``), resumes or starts the training state (``start_state``), plans the run's length
(``retinanet.budget.plan_run``), then runs epochs until the plan is trained: ``run_epoch`` =
``retinanet.engine.train_one_epoch`` (the steps), ``evaluate_epoch`` when due, ``end_epoch`` (history,
``last.pt`` / ``best.pt``, ``metrics.json``). ``finish`` writes the final ``metrics.json``, prints the
summary and draws the pictures; ``fit`` returns a ``TrainResult``.

``run(cfg, out_dir)`` is what ``retinanet-train`` calls: the final validation AP (the value Hydra sweepers
optimise; the EMA weights' AP when ``trainer.ema.decay`` is set). ``retinanet.train`` (``retinanet.api``)
composes the config from Python and calls ``fit``.

Under ``torchrun`` every rank runs this same code: DDP model, sharded batches, sharded evaluation gathered
on rank 0; rank 0 alone logs, writes to the loggers (``retinanet.report.loggers``: the ``logger`` config group),
metrics and checkpoints. Evaluation is
``retinanet.evaluation``, the device and precision ``retinanet.runtime``, checkpoints and resume
``retinanet.checkpoint``.
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
from retinanet.budget import RunPlan, plan_run, train_seconds
from retinanet.checkpoint import Checkpointer, TrainState, keep_epoch_copy, resume_path, resumed_recipe
from retinanet.cli import user_message
from retinanet.config import build, validate_train_config
from retinanet.data.build import build_dataset, build_loader
from retinanet.detector import Detector
from retinanet.ema import ModelEma
from retinanet.engine import EpochEnd, EpochProgress, TrainStep, train_one_epoch
from retinanet.errors import ConfigError, EvaluationError, UserError
from retinanet.evaluation import evaluate, format_metrics, judged_metrics
from retinanet.files import atomic_write_json, remove_stale_temps
from retinanet.model.init import init_from
from retinanet.report import plots, provenance
from retinanet.report.loggers.group import LoggerGroup, open_loggers
from retinanet.report.progress import ProgressLog, bars_wanted, lines_wanted
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
    evaluations: dict = dataclasses.field(default_factory=dict)  # the latest Evaluation per key (val, val_ema)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a finished run made."""

    run_dir: Path
    best: Path | None               # best.pt: the weights of the best judged AP (None if no epoch had an AP)
    last: Path                      # last.pt: the final training state (resume from it)
    metrics: dict                   # the final validation metrics (the EMA weights' when the run keeps an EMA)

    @property
    def ap(self) -> float:
        """The final validation AP (NaN when COCOeval had nothing to score)."""
        ap = self.metrics["stats"]["AP"]
        return float(ap) if ap is not None else float("nan")


def run(cfg: DictConfig, out_dir: str | Path) -> float:
    """``retinanet-train``: train as configured into ``out_dir``; returns the final validation AP."""
    return fit(cfg, out_dir).ap


def fit(cfg: DictConfig, out_dir: str | Path) -> TrainResult:
    """Train, evaluate and checkpoint as configured into ``out_dir``.

    A SIGTERM or Ctrl-C saves ``last.pt`` and exits (``SystemExit(128 + signal)``); resume with
    ``trainer.resume=auto``. In a submitit job its preemption signal does the same, then requeues the job.
    """
    validate_train_config(cfg, allow_auto=True)
    distributed.init_from_env()
    distributed.quiet_other_ranks()
    stop = StopSignal().install()
    try:
        with process_settings(cfg.trainer.threads, cfg.trainer.deterministic):
            return train_run(cfg, Path(distributed.broadcast_object(str(out_dir))), stop)
    except SystemExit:
        stop.hand_over()  # submitit's preemption signal: last.pt is saved, submitit requeues the job
        raise
    finally:
        stop.restore()


def train_run(cfg: DictConfig, out_dir: Path, stop: StopSignal) -> TrainResult:
    """The run, top to bottom (see the module docstring)."""
    device = resolve_device(cfg.device)
    resolved = prepare(cfg, out_dir, device)
    seed_everything(cfg.seed)
    parts = compose(cfg, resolved, out_dir, device)
    state = start_state(cfg, parts, out_dir)
    t = cfg.trainer
    plan = plan_run(parts.train_step.scheduler, parts.steps_per_epoch, t.epochs, t.time_limit, state.budget,
                    state.planned_steps, spent_s=train_seconds(state.history) + state.progress.seconds)
    loggers = open_loggers(cfg, out_dir, state.curves, state.step)
    progress_log = ProgressLog(t.log_every_seconds, plan) if lines_wanted(t.progress) and \
        distributed.info().is_main else None
    status = "FAILED"
    try:
        while state.step < plan.total:
            run_epoch(cfg, state, parts, plan, stop, loggers, progress_log)
        evaluated = [e for e in state.history if "val" in e]
        if evaluated:  # this run's settings with its final numbers (TensorBoard's HParams tab)
            loggers.log_final(judged_metrics(evaluated[-1]), state.step)
        result = finish(cfg, state, out_dir, parts, plan, loggers)
        status = "FINISHED"
        return result
    except SystemExit:  # a signal: last.pt saved, the run continues on resume
        status = "KILLED"
        raise
    finally:
        loggers.close(status)
        parts.train_loader.shutdown()  # the worker processes end with the run
        parts.val_loader.shutdown()


def prepare(cfg: DictConfig, out_dir: Path, device: torch.device) -> dict:
    """The dataset generated if the preset generates one, ``recipe=auto`` applied, the config checked and written
    to ``out_dir/config.yaml``; returns the resolved config (what checkpoints keep)."""
    generate_data(cfg)
    # recipe=auto: the `auto` values fitted to the training set; a resumed run keeps its checkpoint's choices
    recipe.apply(cfg, device, resumed=resumed_recipe(cfg.trainer.resume, out_dir) if recipe.auto_keys(cfg) else None)
    validate_train_config(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if distributed.info().is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out_dir)
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))
    return resolved


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


def compose(cfg: DictConfig, resolved: dict, out_dir: Path, device: torch.device) -> Parts:
    """Datasets, loaders, model, loss, optimiser, schedule, EMA, the training step, the validation detector and the
    checkpointer of a run."""
    dist, t = distributed.info(), cfg.trainer
    train_set, val_set, train_loader, val_loader = build_data(cfg, device)
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
    accumulate = t.accumulate_grad_batches
    global_batch = t.batch_size * dist.world_size * accumulate
    optimizer = build(cfg.optim, model=model, global_batch=global_batch)
    steps_per_epoch = len(train_loader) // accumulate
    scheduler = build(cfg.schedule, optimizer=optimizer, total_steps=steps_per_epoch * (t.epochs or 1))
    autocast_dtype, scaler = precision_setup(str(t.precision), device)
    log.info("model %s: %.2fM parameters, batches of %d images (%d per process x %d process(es) x %d accumulated) "
             "on %s", cfg.model.name, sum(p.numel() for p in model.parameters()) / 1e6, global_batch, t.batch_size,
             dist.world_size, accumulate, device)
    log.info("loss: %s", criterion.describe() if hasattr(criterion, "describe") else type(criterion).__name__)
    train_step = TrainStep(training_model(model, device, t), criterion, anchors, optimizer, scheduler, device,
                           accumulate=accumulate, autocast_dtype=autocast_dtype, scaler=scaler,
                           grad_clip=t.grad_clip, ema=ema, channels_last=t.channels_last,
                           max_bad_steps=t.max_bad_steps, bad_batch_dir=out_dir)
    label_map = {"class_names": list(train_set.class_names), "category_ids": [int(c) for c in train_set.label_to_cat_id]}
    detector = Detector.from_config(resolved, label_map, device, model=model, quiet=True, precision=str(t.precision))
    checkpointer = Checkpointer(
        out_dir, model, optimizer, scheduler, scaler, ema, config=resolved, label_map=label_map,
        sampler_key={"world_size": dist.world_size, "batch_size": t.batch_size, "accumulate": accumulate,
                     "batches_per_epoch": len(train_loader), "seed": cfg.seed, "train_images": len(train_set)})
    return Parts(train_set, val_set, train_loader, val_loader, model, criterion, ema, train_step, detector,
                 checkpointer, steps_per_epoch)


def build_data(cfg: DictConfig, device: torch.device) -> tuple:
    """The train and val datasets and this rank's loaders of them."""
    dist, t = distributed.info(), cfg.trainer
    progress = t.progress and dist.is_main  # data.verify's progress bars
    train_set = build_dataset(cfg.data, "train", train=True, progress=progress)
    val_set = build_dataset(cfg.data, "val", train=False, progress=progress)
    if train_set.label_to_cat_id != val_set.label_to_cat_id:
        raise ConfigError(f"train and val categories differ: {train_set.ann_file} has {train_set.label_to_cat_id}, "
                          f"{val_set.ann_file} has {val_set.label_to_cat_id}")
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
    return train_set, val_set, train_loader, val_loader


def training_model(model: torch.nn.Module, device: torch.device, t: DictConfig) -> torch.nn.Module:
    """The model the training step runs: DDP-wrapped under torchrun, compiled with ``trainer.compile``."""
    train_model = distributed.wrap_model(model, device, t.sync_bn)
    if t.compile:  # the training forward / backward only; evaluation runs the plain model (few, varied shapes)
        log.info("trainer.compile=true: torch.compile (inductor) of the training model; the first steps compile")
        train_model = torch.compile(train_model)
    return train_model


def start_state(cfg: DictConfig, parts: Parts, out_dir: Path) -> TrainState:
    """A new training state, or the one ``trainer.resume`` points to (every object of ``parts`` restored)."""
    dist = distributed.info()
    if dist.is_main:  # versions, git commit, annotation files: in every checkpoint and the model card
        parts.checkpointer.provenance = provenance.collect(cfg.data.name, parts.train_set, parts.val_set)
    path = distributed.broadcast_object(resume_path(cfg.trainer.resume, out_dir) if dist.is_main else None)
    return parts.checkpointer.load(path) if path is not None else TrainState()


def run_epoch(cfg: DictConfig, state: TrainState, parts: Parts, plan: RunPlan, stop: StopSignal,
              loggers: LoggerGroup, progress_log: ProgressLog | None = None) -> None:
    """Epoch ``state.epoch`` from where ``state`` is: train, evaluate when due, checkpoint. A signal: ``last.pt``
    saved, then ``SystemExit``."""
    t, epoch = cfg.trainer, state.epoch
    parts.train_loader.batch_sampler.set_epoch(epoch, skip=state.progress.batches)
    bars = bars_wanted(t.progress) and distributed.info().is_main
    result = train_one_epoch(parts.train_step, parts.train_loader, state, plan, loggers=loggers,
                             log_every=t.log_every, checkpointer=parts.checkpointer,
                             checkpoint_every=t.checkpoint_every_steps, stop_requested=stop.requested,
                             show_progress=bars, progress_log=progress_log)
    if result.end is EpochEnd.STOPPED:
        parts.checkpointer.save(state, epoch_complete=False)
        log.warning("stopped by a signal at step %d (epoch %d, %d of %d batches): saved %s; continue with "
                    "trainer.resume=auto (same run dir) or trainer.resume=%s", state.step, epoch,
                    state.progress.batches, len(parts.train_loader), parts.checkpointer.last, parts.checkpointer.last)
        raise SystemExit(stop.exit_code())
    last = state.step >= plan.total
    m = result.metrics
    log.info("epoch %d%s: loss %.4f (cls %.4f, box %.4f), %.1f images/s, step %d of %d", epoch,
             " (the last)" if last else "", m.get("loss", float("nan")), m.get("loss_cls", float("nan")),
             m.get("loss_box", float("nan")), m["images_per_s"], state.step, plan.total)
    entry = {"epoch": epoch, "step": state.step, "train": m, "bad_steps": state.bad_steps}
    if last or (t.eval_every and epoch % t.eval_every == 0):
        try:
            evaluate_epoch(entry, parts, loggers, bars, cfg.evaluation.backend)
        except Exception as err:  # the training is kept: saved without this evaluation, then the error
            end_epoch(state, entry, parts.checkpointer, t.keep_last)
            raise evaluation_failed(err, epoch, parts.checkpointer.last) from err
    end_epoch(state, entry, parts.checkpointer, t.keep_last)
    if distributed.any_rank(stop.requested()):
        log.warning("stopped by a signal after epoch %d: saved %s", epoch, parts.checkpointer.last)
        raise SystemExit(stop.exit_code())


def evaluate_epoch(entry: dict, parts: Parts, loggers: LoggerGroup, progress: bool,
                   backend: str = "pycocotools") -> None:
    """Evaluate the weights (and the EMA weights) into ``entry``; its numbers (and what they draw of it) to the
    loggers."""
    nets = [("val", parts.detector)]
    if parts.ema is not None:
        nets.append(("val_ema", parts.detector.with_model(parts.ema.module)))
    for key, detector in nets:
        result = evaluate(detector, parts.val_loader, parts.val_set, parts.criterion,
                          progress=progress and distributed.info().is_main, desc=key, backend=backend)
        entry[key] = result.metrics
        parts.evaluations[key] = result
        loggers.log_evaluation(key, entry["step"], result, parts.val_set, entry["epoch"])
        stats = result.metrics["stats"]
        log.info("epoch %d: %s AP %s AP50 %s", entry["epoch"], "val" if key == "val" else "val (EMA weights)",
                 _fmt(stats["AP"]), _fmt(stats["AP50"]))


def evaluation_failed(err: Exception, epoch: int, saved: Path) -> Exception:
    """The error of an evaluation that failed after the weights were saved: what failed and how to evaluate them
    (a ``UserError`` when the cause is one, e.g. an image that cannot be read)."""
    message = (f"the evaluation after epoch {epoch} failed: {type(err).__name__}: {user_message(err)}; the trained "
               f"weights are saved in {saved}: evaluate them with `retinanet-evaluate checkpoint={saved}` once the "
               "cause is fixed")
    return EvaluationError(message) if isinstance(err, UserError) else RuntimeError(message)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def end_epoch(state: TrainState, entry: dict, checkpointer: Checkpointer, keep_last: int) -> None:
    """The epoch into the history; ``last.pt`` (and ``best.pt`` when the judged AP improved), the epoch copies and
    ``metrics.json``."""
    state.history.append(entry)
    ap = judged_ap(entry)
    improved = ap is not None and ap > state.best_ap
    if improved:
        state.best_ap = ap
    state.progress = EpochProgress()
    checkpointer.save(state, epoch_complete=True, metrics=judged_metrics(entry))
    state.epoch = entry["epoch"] + 1
    if improved:
        checkpointer.mark_best()
    if distributed.info().is_main:
        keep_epoch_copy(checkpointer.last, entry["epoch"], keep_last)
        atomic_write_json({"history": state.history}, checkpointer.out_dir / "metrics.json")


def judged_ap(entry: dict) -> float | None:
    """The AP an epoch is judged by (``judged_metrics``); None when it was not evaluated or had nothing to score."""
    val = judged_metrics(entry)
    return None if val is None or val["stats"]["AP"] is None else float(val["stats"]["AP"])


def finish(cfg: DictConfig, state: TrainState, out_dir: Path, parts: Parts, plan: RunPlan,
           loggers: LoggerGroup | None = None) -> TrainResult:
    """Final metrics.json, printed summary and pictures (rank 0), which go to the loggers with the model card;
    the result on every rank."""
    evaluated = [e for e in state.history if "val" in e]
    if not evaluated:
        raise ConfigError(f"trainer.resume: the run in {out_dir} has already trained all its steps but holds no "
                          "evaluation; raise trainer.epochs to train on")
    last = evaluated[-1]
    if distributed.info().is_main:
        summary = write_summary(cfg, state, out_dir, last)
        print_summary(cfg, state, parts.val_set, last, summary, timed=plan.budget is not None)
        pictures = []
        if cfg.evaluation.plots.enabled:
            p = cfg.evaluation.plots
            final = parts.evaluations.get("val_ema" if "val_ema" in last else "val")
            pictures = plots.write_run_plots(out_dir / "plots", state.history, state.curves, final, parts.val_set,
                                             p.score_thresh, p.iou_thresh, p.num_images)
        if loggers is not None:
            loggers.log_artifacts([*pictures, *(out_dir / n for n in ("model_card.md", "model_card.json",
                                                                      "metrics.json", "config.yaml"))], out_dir)
        print(f"outputs: {out_dir}")
    best = out_dir / "best.pt"
    return TrainResult(out_dir, best if best.is_file() else None, out_dir / "last.pt", judged_metrics(last))


def write_summary(cfg: DictConfig, state: TrainState, out_dir: Path, last: dict) -> dict:
    """The final ``metrics.json``: the history, the final metrics and the run's throughput and length."""
    images = sum(e["train"]["images"] for e in state.history)
    seconds = train_seconds(state.history)
    summary = {"history": state.history, "final": last["val"], "final_ema": last.get("val_ema"),
               "train_images_per_s": images / max(seconds, 1e-9), "train_seconds": seconds,
               "world_size": distributed.info().world_size, "bad_steps": state.bad_steps,
               "resumed_from": state.resumed_from, "steps": state.step, "epochs_planned": cfg.trainer.epochs,
               "epochs_trained": len(state.history), "time_limit": cfg.trainer.time_limit}
    atomic_write_json(summary, out_dir / "metrics.json")
    return summary


def print_summary(cfg: DictConfig, state: TrainState, val_set, last: dict, summary: dict, timed: bool) -> None:
    """The final COCO table, the throughput and (``timed``) how much of the time limit the run used."""
    names = dict(zip(val_set.label_to_cat_id, val_set.class_names))
    which = " (EMA weights)" if "val_ema" in last else ""
    print(f"\nCOCO evaluation{which} on {cfg.data.name} val ({len(val_set)} images):\n"
          + format_metrics(judged_metrics(last), names))
    seconds = summary["train_seconds"]
    images = sum(e["train"]["images"] for e in state.history)
    print(f"\ntraining throughput: {summary['train_images_per_s']:.1f} images/s ({images:.0f} images in "
          f"{seconds:.0f} s, {state.step} steps, {len(state.history)} epochs)")
    if timed:
        asked = f"of the {cfg.trainer.epochs} epochs asked for" if cfg.trainer.epochs else "planned from the pace"
        print(f"trainer.time_limit={cfg.trainer.time_limit:g}s: trained {seconds:.0f} s "
              f"({seconds / cfg.trainer.time_limit:.1%} of the budget), {state.step} steps {asked}")
