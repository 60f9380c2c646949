"""Build everything from a composed config and run training with evaluation and checkpoints.

``run(cfg, out_dir)`` is what ``scripts/train.py`` calls; tests call it too with a config
from Hydra's compose API. It returns the final validation AP (the value Hydra sweepers optimise;
the EMA weights' AP when ``trainer.ema.decay`` is set).

Under ``torchrun`` every rank runs this same function: DDP model, sharded batches, sharded
evaluation gathered on rank 0; rank 0 alone logs, writes TensorBoard, metrics and checkpoints.
Checkpoint contents and resume: ``retinanet.resume``.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from retinanet import distributed
from retinanet.budget import epochs_within, train_seconds
from retinanet.checkpoint import atomic_write_json, keep_epoch_copy, remove_stale_temps, resume_path
from retinanet.config import validate_train_config
from retinanet.data import CocoDetection
from retinanet.data.build import build_dataset, build_loader
from retinanet.ema import ModelEma
from retinanet.engine import TERMS, EpochProgress, StepContext, predict, train_one_epoch
from retinanet.errors import ConfigError
from retinanet.evaluation import coco_evaluate, format_metrics, to_coco_results
from retinanet.optim import set_total_steps
from retinanet.tensorboard import log_eval_visuals, log_hparams
from retinanet.resume import Checkpointer, StopSignal, TrainState
from retinanet.model.init import init_from

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``device`` config -> torch device; under torchrun a CUDA device is this process's GPU (LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available on this machine; use device=cpu")
    if device.type == "cuda" and distributed.info().enabled:
        device = torch.device("cuda", distributed.info().local_rank)
    return device


def native_bf16(device: torch.device) -> bool:
    """Does ``device`` compute bf16 in hardware (CPU: AVX512-BF16 or AMX; CUDA: Ampere or newer)?"""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        checks = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        return any(check() for check in checks if check is not None)
    return False


def precision_setup(precision: str, device: torch.device):
    """Autocast dtype and GradScaler for ``trainer.precision``."""
    if precision == "auto":
        native = native_bf16(device)
        log.info("trainer.precision=auto: %s", "bf16-mixed (this %s computes bf16 natively)" % device.type if native
                 else "32 (no native bf16 on this %s: bf16 would be emulated, slower than fp32)" % device.type)
        precision = "bf16-mixed" if native else "32"
    if precision == "32":
        return None, None
    if precision == "16-mixed":
        if device.type != "cuda":
            raise ConfigError("trainer.precision=16-mixed needs CUDA; on CPU use bf16-mixed or 32")
        log.info("fp16 autocast with a dynamic loss scale (GradScaler); loss computed in fp32")
        return torch.float16, torch.amp.GradScaler("cuda")
    if device.type == "cpu":
        log.info("trainer.precision=bf16-mixed on CPU: bf16 autocast (loss computed in fp32)")
    else:
        log.info("bf16 autocast (loss computed in fp32, no loss scaling needed)")
    return torch.bfloat16, None


@contextlib.contextmanager
def process_settings(cfg: DictConfig):
    """Threads, deterministic algorithms and SIGTERM / Ctrl-C handling for this run, restored afterwards
    (``run`` may be called many times in one process: tests, sweeps)."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    stop = StopSignal().install()
    try:
        if cfg.trainer.threads:
            torch.set_num_threads(cfg.trainer.threads)
        if cfg.trainer.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        yield stop
    finally:
        stop.restore()
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.backends.cudnn.benchmark = benchmark


def build_optimizer(cfg: DictConfig, model: torch.nn.Module, global_batch: int) -> torch.optim.Optimizer:
    """``cfg.optim`` with the learning rate scaled linearly from ``optim.reference_batch_size`` to ``global_batch``."""
    kwargs = OmegaConf.to_container(cfg.optim, resolve=True)
    reference = kwargs.pop("reference_batch_size", None)
    if reference:
        lr = kwargs["lr"] * global_batch / reference
        log.info("learning rate %.4g = optim.lr %.4g x global batch %d / optim.reference_batch_size %d "
                 "(linear scaling)", lr, kwargs["lr"], global_batch, reference)
        kwargs["lr"] = lr
    else:
        log.info("learning rate %.4g for a global batch of %d, as given (set optim.reference_batch_size to scale "
                 "it linearly with the batch)", kwargs["lr"], global_batch)
    return instantiate(kwargs, model=model)


def label_map(dataset: CocoDetection) -> dict:
    return {"class_names": list(dataset.class_names), "category_ids": [int(c) for c in dataset.label_to_cat_id]}


def run(cfg: DictConfig, out_dir: str | Path) -> float:
    """Train, evaluate and checkpoint as configured. Returns the final validation AP.

    A SIGTERM or Ctrl-C saves ``last.pt`` and exits (``SystemExit(128 + signal)``); resume with
    ``trainer.resume=auto``.
    """
    validate_train_config(cfg)
    distributed.init_from_env()
    distributed.quiet_other_ranks()
    with process_settings(cfg) as stop:
        return _train(cfg, Path(distributed.broadcast_object(str(out_dir))), stop)


def _train(cfg: DictConfig, out_dir: Path, stop: StopSignal) -> float:
    dist_info = distributed.info()
    is_main = dist_info.is_main
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out_dir)
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))
    seed_everything(cfg.seed)
    device = resolve_device(str(cfg.device))

    if cfg.data.generate is not None:  # rank 0 first: the others then find the data ready
        if is_main:
            instantiate(cfg.data.generate)
        distributed.barrier()
        if not is_main:
            instantiate(cfg.data.generate)
    train_set = build_dataset(cfg.data, "train", train=True)
    val_set = build_dataset(cfg.data, "val", train=False)
    if train_set.label_to_cat_id != val_set.label_to_cat_id:
        raise ValueError(f"train and val categories differ: {train_set.label_to_cat_id} vs {val_set.label_to_cat_id}")
    num_classes = train_set.num_classes
    pin = device.type == "cuda"
    accumulate = cfg.trainer.accumulate_grad_batches
    shards = dict(num_replicas=dist_info.world_size, rank=dist_info.rank)
    train_loader = build_loader(train_set, cfg.trainer.batch_size, True, cfg.trainer.num_workers,
                                cfg.data.size_divisible, cfg.seed, pin, batches_multiple_of=accumulate,
                                aspect_grouping=cfg.trainer.aspect_ratio_grouping, **shards)
    val_loader = build_loader(val_set, cfg.trainer.eval_batch_size, False, cfg.trainer.num_workers,
                              cfg.data.size_divisible, cfg.seed, pin, **shards)
    if len(train_loader) < accumulate:
        raise ConfigError(f"trainer.accumulate_grad_batches={accumulate} is more than the "
                          f"{train_loader.batch_sampler.full_batches} "
                          f"batches of {cfg.trainer.batch_size} images per epoch of each of {dist_info.world_size} "
                          "process(es)")
    log.info("data: %d train / %d val images, %d classes: %s", len(train_set), len(val_set), num_classes,
             ", ".join(train_set.class_names))

    anchors = instantiate(cfg.model.anchors)
    model = instantiate(cfg.model.net, num_classes=num_classes, num_anchors=anchors.num_anchors_per_location)
    if cfg.model.get("init_from"):
        init_from(model, cfg.model.init_from)
    model.to(device)
    if cfg.trainer.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.trainer.sync_bn and device.type != "cuda":
        raise ConfigError("trainer.sync_bn=true needs CUDA (torch's SyncBatchNorm runs on GPUs only); on CPU use "
                          "model.net.norm=gn or frozen_bn, whose results do not depend on the batch split")
    ema = ModelEma(model, cfg.trainer.ema.decay) if cfg.trainer.ema.decay else None
    train_model = distributed.wrap_model(model, device, cfg.trainer.sync_bn)  # DDP under torchrun
    criterion = instantiate(cfg.loss, num_classes=num_classes, **alpha_override(cfg, train_set))
    if dist_info.enabled:
        criterion.num_pos_reducer = distributed.all_reduce_sum  # normalise by the positives of the global batch
    postprocess = instantiate(cfg.postprocess)
    global_batch = cfg.trainer.batch_size * dist_info.world_size * accumulate
    optimizer = build_optimizer(cfg, model, global_batch)
    steps_per_epoch = len(train_loader) // accumulate
    total_steps = cfg.trainer.epochs * steps_per_epoch
    scheduler = instantiate(cfg.schedule, optimizer=optimizer, total_steps=total_steps)
    autocast_dtype, scaler = precision_setup(str(cfg.trainer.precision), device)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s: %.2fM parameters, %d steps of %d images (%d per process x %d process(es) x %d accumulated) "
             "on %s", cfg.model.name, n_params / 1e6, total_steps, global_batch, cfg.trainer.batch_size,
             dist_info.world_size, accumulate, device)
    log.info("loss: %s", describe_loss(cfg.loss))

    checkpointer = Checkpointer(
        out_dir, model, optimizer, scheduler, scaler, ema, config=resolved, label_map=label_map(train_set),
        sampler_key={"world_size": dist_info.world_size, "batch_size": cfg.trainer.batch_size,
                     "accumulate": accumulate, "batches_per_epoch": len(train_loader), "seed": cfg.seed,
                     "train_images": len(train_set)})
    path = distributed.broadcast_object(resume_path(cfg.trainer.resume, out_dir) if is_main else None)
    state = checkpointer.load(path) if path is not None else TrainState()
    set_total_steps(scheduler, planned_epochs(cfg, state) * steps_per_epoch)  # a resumed run's own plan
    if cfg.trainer.time_limit:
        log.info("trainer.time_limit=%gs: after each epoch the run checks that the epochs left fit in the time left, "
                 "and trains fewer (the schedule re-planned to end with them) if not", cfg.trainer.time_limit)
    writer = None
    if is_main:
        from torch.utils.tensorboard import SummaryWriter  # imported late: slow import

        writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=state.step + 1 if state.step else None)

    def after_step(step: int, progress: EpochProgress) -> None:
        every = cfg.trainer.checkpoint_every_steps
        if every and step % every == 0 and progress.batches < len(train_loader):  # epoch ends save anyway
            state.step, state.bad_steps = step, ctx.bad_steps
            checkpointer.save(state, epoch_complete=False)

    ctx = StepContext(criterion=criterion, anchors=anchors, device=device, channels_last=cfg.trainer.channels_last,
                      autocast_dtype=autocast_dtype, scaler=scaler, grad_clip=cfg.trainer.grad_clip,
                      log_every=cfg.trainer.log_every, writer=writer, progress=cfg.trainer.progress and is_main,
                      accumulate=accumulate, world_size=dist_info.world_size, rank=dist_info.rank,
                      loss_scale=dist_info.world_size if criterion.normalization == "batch" else 1.0,
                      ema=ema, max_bad_steps=cfg.trainer.max_bad_steps, bad_steps=state.bad_steps,
                      bad_batch_dir=out_dir, stop_requested=stop.requested, after_step=after_step)
    try:
        train_epochs(cfg, state, train_model, train_loader, optimizer, scheduler, ctx, checkpointer, stop,
                     (model, ema, val_loader, postprocess, val_set))
        evaluated = [e for e in state.history if "val" in e]
        if writer is not None and evaluated:  # the HParams tab: this run's settings with its final numbers
            log_hparams(writer, cfg, evaluated[-1].get("val_ema") or evaluated[-1]["val"], step=state.step)
    finally:
        if writer is not None:
            writer.close()
    return finish(cfg, state, out_dir, val_set, dist_info)


def train_epochs(cfg: DictConfig, state: TrainState, train_model, train_loader, optimizer, scheduler,
                 ctx: StepContext, checkpointer: Checkpointer, stop: StopSignal, evaluation: tuple) -> None:
    """The epoch loop from ``state`` on: train, evaluate, checkpoint; exits (checkpoint saved) on a signal."""
    model, ema, val_loader, postprocess, val_set = evaluation
    epoch = state.epoch
    while epoch <= planned_epochs(cfg, state):
        state.epoch = epoch
        train_loader.batch_sampler.set_epoch(epoch, skip=state.progress.batches)
        stats = train_one_epoch(train_model, train_loader, optimizer, scheduler, ctx, epoch, state.step, state.progress)
        state.step, state.bad_steps = stats["step"], ctx.bad_steps
        if stats["interrupted"]:
            checkpointer.save(state, epoch_complete=False)
            log.warning("stopped by a signal at step %d (epoch %d, %d of %d batches): saved %s; continue with "
                        "trainer.resume=auto (same run dir) or trainer.resume=%s", state.step, epoch,
                        state.progress.batches, len(train_loader), checkpointer.last, checkpointer.last)
            raise SystemExit(stop.exit_code())
        apply_time_limit(cfg, state, stats["seconds"], scheduler, len(train_loader) // ctx.accumulate)
        last_epoch = planned_epochs(cfg, state)
        log.info("epoch %d/%d: loss %.4f (cls %.4f, box %.4f), %.1f images/s", epoch, last_epoch,
                 stats["loss"], stats["loss_cls"], stats["loss_box"], stats["images_per_s"])
        entry = {"epoch": epoch, "step": state.step, "train": stats, "bad_steps": state.bad_steps}
        if epoch == last_epoch or (cfg.trainer.eval_every and epoch % cfg.trainer.eval_every == 0):
            evaluate_epoch(entry, model, ema, val_loader, postprocess, ctx, val_set, ctx.writer)
        state.history.append(entry)
        ap = final_ap(entry)
        improved = ap is not None and ap > state.best_ap
        if improved:
            state.best_ap = ap
        state.progress = EpochProgress()
        checkpointer.save(state, epoch_complete=True, metrics=entry.get("val"))
        if improved:
            checkpointer.mark_best()
        if distributed.info().is_main:
            keep_epoch_copy(checkpointer.last, epoch, cfg.trainer.keep_last)
            atomic_write_json({"history": state.history}, checkpointer.out_dir / "metrics.json")
        if distributed.any_rank(stop.requested()):
            log.warning("stopped by a signal after epoch %d: saved %s", epoch, checkpointer.last)
            raise SystemExit(stop.exit_code())
        epoch += 1


def planned_epochs(cfg: DictConfig, state: TrainState) -> int:
    """The epochs this run trains: ``trainer.epochs``, or fewer once ``trainer.time_limit`` has cut the run."""
    if state.epochs_cut is not None and cfg.trainer.time_limit:
        return min(cfg.trainer.epochs, state.epochs_cut)
    return cfg.trainer.epochs


def apply_time_limit(cfg: DictConfig, state: TrainState, epoch_seconds: float, scheduler, steps_per_epoch: int) -> None:
    """After training epoch ``state.epoch``: cut the run to the epochs that fit in ``trainer.time_limit``
    (the same decision on every rank) and re-plan the learning-rate schedule to end with them."""
    if not cfg.trainer.time_limit:
        return
    planned = planned_epochs(cfg, state)
    spent = train_seconds(state.history) + epoch_seconds
    fit = distributed.broadcast_object(epochs_within(cfg.trainer.time_limit, planned, state.epoch, spent,
                                                     epoch_seconds))
    if fit >= planned:
        return
    log.warning("trainer.time_limit=%gs: %.0f s trained in %d epoch(s), %.0f s for the last one; %d more would end at "
                "about %.0f s, so the run stops after epoch %d of %d (the schedule now ends there; "
                "trainer.time_limit=null trains them all)", cfg.trainer.time_limit, spent, state.epoch,
                epoch_seconds, planned - state.epoch, spent + (planned - state.epoch) * epoch_seconds, fit,
                cfg.trainer.epochs)
    state.epochs_cut = fit
    set_total_steps(scheduler, fit * steps_per_epoch)


def final_ap(entry: dict) -> float | None:
    """The AP an epoch is judged by: of the EMA weights when there are any."""
    val = entry.get("val_ema") or entry.get("val")
    return None if val is None else float(val["stats"]["AP"])


def evaluate_epoch(entry: dict, model, ema, val_loader, postprocess, ctx: StepContext, val_set, writer) -> None:
    """Evaluate the weights (and the EMA weights) into ``entry``; curves to TensorBoard."""
    for key, net in (("val", model), ("val_ema", None if ema is None else ema.module)):
        if net is None:
            continue
        metrics = evaluate_split(net, val_loader, postprocess, ctx, val_set, step=entry["step"], prefix=key)
        entry[key] = metrics
        if writer is not None:
            for name, value in {**metrics["stats"], **metrics["loss"]}.items():
                writer.add_scalar(f"{key}/{name}", value, entry["step"])
        log.info("epoch %d: %s AP %.3f AP50 %.3f", entry["epoch"], "val" if key == "val" else "val (EMA weights)",
                 metrics["stats"]["AP"], metrics["stats"]["AP50"])


def finish(cfg: DictConfig, state: TrainState, out_dir: Path, val_set: CocoDetection, dist_info) -> float:
    """Final metrics.json and printed summary (rank 0); returns the final AP on every rank."""
    evaluated = [e for e in state.history if "val" in e]
    if not evaluated:
        raise ConfigError(f"trainer.resume: the run in {out_dir} has already trained all {cfg.trainer.epochs} "
                          "epochs but holds no evaluation; raise trainer.epochs to train on")
    last = evaluated[-1]
    metrics = last.get("val_ema") or last["val"]
    images = sum(e["train"]["images"] for e in state.history)
    seconds = train_seconds(state.history)
    throughput = images / max(seconds, 1e-9)
    if dist_info.is_main:
        summary = {"history": state.history, "final": last["val"], "final_ema": last.get("val_ema"),
                   "train_images_per_s": throughput, "world_size": dist_info.world_size,
                   "bad_steps": state.bad_steps, "resumed_from": state.resumed_from,
                   "epochs_planned": cfg.trainer.epochs, "epochs_trained": len(state.history)}
        atomic_write_json(summary, out_dir / "metrics.json")
        names = dict(zip(val_set.label_to_cat_id, val_set.class_names))
        which = " (EMA weights)" if "val_ema" in last else ""
        print(f"\nCOCO evaluation{which} on {cfg.data.name} val ({len(val_set)} images):\n"
              + format_metrics(metrics, names))
        print(f"\ntraining throughput: {throughput:.1f} images/s ({images:.0f} images in {seconds:.0f} s)")
        trained = planned_epochs(cfg, state)
        if trained < cfg.trainer.epochs:
            print(f"trainer.time_limit={cfg.trainer.time_limit:g}s: trained {trained} of the "
                  f"{cfg.trainer.epochs} planned epochs: the others would not have fitted")
        print(f"outputs: {out_dir}")
    return float(metrics["stats"]["AP"])


PAPER_LOSS = {"alpha": 0.25, "gamma": 2.0, "fg_iou": 0.5, "bg_iou": 0.4}  # Lin et al. 2017


def describe_loss(loss_cfg: DictConfig) -> str:
    """One line for the log: the focal-loss and matcher values in use, with the paper's when they differ
    (the CPU preset's ``loss=focal_cpu`` does, and a user should see it)."""
    values = {"alpha": loss_cfg.alpha, "gamma": loss_cfg.gamma,
              "fg_iou": loss_cfg.matcher.fg_iou, "bg_iou": loss_cfg.matcher.bg_iou}
    box = str(loss_cfg.box_loss) + (f" (beta {loss_cfg.beta})" if loss_cfg.box_loss == "smooth_l1" else "")
    text = (f"sigmoid focal alpha {values['alpha']}, gamma {values['gamma']}"
            + (f", label smoothing {loss_cfg.label_smoothing}" if loss_cfg.get("label_smoothing") else "")
            + f"; box {box}; matcher fg_iou {values['fg_iou']} / bg_iou {values['bg_iou']}")
    if values != PAPER_LOSS:
        p = {k: f"{v:g}" for k, v in PAPER_LOSS.items()}
        text += f" (the paper: alpha {p['alpha']}, gamma {p['gamma']}, matcher {p['fg_iou']} / {p['bg_iou']}, i.e. loss=focal)"
    return text


def alpha_override(cfg: DictConfig, train_set: CocoDetection) -> dict:
    """``loss.alpha=auto``: per-class alpha from training-set class frequencies (see losses.alpha_from_counts)."""
    if cfg.loss.alpha != "auto":
        return {}
    from retinanet.losses import alpha_from_counts

    alpha = alpha_from_counts(train_set.class_counts())
    log.info("loss.alpha=auto -> %s", [round(float(a), 3) for a in alpha])
    return {"alpha": alpha}


def evaluate_split(model, loader, postprocess, ctx: StepContext, dataset: CocoDetection, step: int | None = None,
                   prefix: str = "val") -> dict:
    """Detections on ``loader`` -> COCO numbers, per-class AP and mean validation losses.

    Under DDP each rank predicts its share of the images; rank 0 gathers them, drops the repeats
    that pad the shares to equal length and runs COCOeval once; every rank gets the metrics.
    With a TensorBoard writer and a ``step``, rank 0 also logs what the detector does (val images
    with ground truth and detections, per-class PR curves and AP, the score distribution) under ``prefix``.
    """
    t0 = time.perf_counter()
    detections, image_ids, losses = predict(model, loader, postprocess, ctx)
    if ctx.world_size > 1:
        shards = distributed.gather_to_main((detections, image_ids))
        detections, image_ids = merge_shards(shards) if shards is not None else ([], [])
        losses = {k: float(distributed.all_reduce_sum(torch.tensor(v * (ctx.loss_scale if k in TERMS else 1.0))))
                  / (ctx.world_size if k in TERMS else 1) for k, v in losses.items()}
    metrics = None
    if distributed.info().is_main:
        results = to_coco_results(detections, image_ids, dataset.label_to_cat_id)
        metrics = coco_evaluate(dataset.coco, results, image_ids, with_precision=True)
        precision = metrics.pop("precision", None)
        if ctx.writer is not None and step is not None:
            log_eval_visuals(ctx.writer, step, dataset, detections, image_ids, metrics, precision, prefix=prefix)
        metrics["loss"] = losses
        metrics["images"] = len(image_ids)
        metrics["seconds"] = time.perf_counter() - t0
    return distributed.broadcast_object(metrics)


def merge_shards(shards: list[tuple[list, list]]) -> tuple[list, list]:
    """Detections of every rank in one list, each image once (the sampler repeats some to even out shares)."""
    detections, image_ids, seen = [], [], set()
    for dets, ids in shards:
        for d, i in zip(dets, ids):
            if i not in seen:
                seen.add(i)
                detections.append(d)
                image_ids.append(i)
    return detections, image_ids
