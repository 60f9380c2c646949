"""Check a composed training config before any work starts: one clear message per mistake."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from retinanet.errors import ConfigError
from retinanet.model.backbone import NORMS, RESNETS
from retinanet.model.head import HEAD_NORMS
from retinanet.optim import OPTIMIZERS, SCHEDULES

PRECISIONS = ("32", "16-mixed", "bf16-mixed", "auto")


def _number(cfg: DictConfig, key: str, lo: float | None = None, hi: float | None = None, integer: bool = False,
            allow_none: bool = False, lo_open: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None and allow_none:
        return
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise ConfigError(f"{key}={value!r} must be {kind}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ConfigError(f"{key}={value!r} must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}={value!r} must be <= {hi}")


def _choice(cfg: DictConfig, key: str, choices) -> None:
    value = OmegaConf.select(cfg, key)
    if str(value) not in {str(c) for c in choices}:
        raise ConfigError(f"{key}={value!r} is not one of {list(choices)}")


def _alpha(cfg: DictConfig) -> None:
    alpha = cfg.loss.alpha
    if alpha is None or alpha == "auto":
        return
    values = list(alpha) if OmegaConf.is_list(alpha) else [alpha]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise ConfigError(f"loss.alpha={OmegaConf.to_object(alpha) if OmegaConf.is_list(alpha) else alpha!r} "
                              "must be null, 'auto', a number in [0, 1] or a per-class list of such numbers")


def _train_loop(cfg: DictConfig) -> None:
    """Keys of scaling out and of never losing a run (accumulation, resume, checkpoints, EMA, ...)."""
    _number(cfg, "trainer.accumulate_grad_batches", 1, integer=True)
    _number(cfg, "trainer.checkpoint_every_steps", 0, integer=True)
    _number(cfg, "trainer.keep_last", 0, integer=True)
    _number(cfg, "trainer.max_bad_steps", 0, integer=True)
    _number(cfg, "trainer.ema.decay", 0, 1, allow_none=True, lo_open=True)
    if cfg.trainer.ema.decay is not None and cfg.trainer.ema.decay >= 1:
        raise ConfigError(f"trainer.ema.decay={cfg.trainer.ema.decay} must be < 1 (e.g. 0.9998), or null for no EMA")
    for key in ("aspect_ratio_grouping", "sync_bn", "deterministic"):
        if not isinstance(cfg.trainer[key], bool):
            raise ConfigError(f"trainer.{key}={cfg.trainer[key]!r} must be true or false")
    _number(cfg, "optim.reference_batch_size", 1, integer=True, allow_none=True)
    resume = cfg.trainer.resume
    if resume is not None and not isinstance(resume, str):
        raise ConfigError(f"trainer.resume={resume!r} must be null, auto or the path of a checkpoint")
    if resume not in (None, "auto") and not Path(resume).is_file():
        raise ConfigError(f"trainer.resume={resume!r} does not exist; give a checkpoint file (last.pt), "
                          "auto (the run dir's last.pt if any) or null")


def _min_size(cfg: DictConfig) -> None:
    """``data.min_size``: a number of pixels, or a list of them (multi-scale training)."""
    sizes = cfg.data.min_size
    values = list(sizes) if OmegaConf.is_list(sizes) else [sizes]
    shown = OmegaConf.to_object(sizes) if OmegaConf.is_list(sizes) else sizes
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ConfigError(f"data.min_size={shown!r} must be a positive integer or a non-empty list of them "
                          "(multi-scale training: each training image draws its shorter side from the list)")
    _number(cfg, "data.max_size", max(values), integer=True)


def validate_train_config(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` naming the key and value of the first problem found."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        raise ConfigError(f"{err.full_key} is mandatory for this preset: set it on the command line, "
                          f"e.g. {err.full_key}=/path/to/...") from None
    except InterpolationResolutionError as err:
        raise ConfigError(f"cannot resolve {err.full_key}: {err.msg}") from None
    _number(cfg, "trainer.epochs", 1, integer=True)
    _number(cfg, "trainer.time_limit", 0, allow_none=True, lo_open=True)
    _number(cfg, "trainer.batch_size", 1, integer=True)
    _number(cfg, "trainer.eval_batch_size", 1, integer=True)
    _number(cfg, "trainer.num_workers", 0, integer=True)
    _number(cfg, "trainer.eval_every", 0, integer=True)
    _number(cfg, "trainer.log_every", 1, integer=True)
    _number(cfg, "trainer.grad_clip", 0, allow_none=True, lo_open=True)
    _number(cfg, "trainer.threads", 1, integer=True, allow_none=True)
    _choice(cfg, "trainer.precision", PRECISIONS)
    _train_loop(cfg)
    _number(cfg, "optim.lr", 0, lo_open=True)
    _number(cfg, "optim.weight_decay", 0)
    _choice(cfg, "optim.name", OPTIMIZERS)
    _choice(cfg, "schedule.name", SCHEDULES)
    _number(cfg, "schedule.warmup_steps", 0, integer=True)
    _number(cfg, "schedule.warmup_factor", 0, 1)
    _number(cfg, "loss.gamma", 0)
    _number(cfg, "loss.beta", 0)
    _number(cfg, "loss.label_smoothing", 0, 1)
    _alpha(cfg)
    _number(cfg, "loss.matcher.fg_iou", 0, 1)
    _number(cfg, "loss.matcher.bg_iou", 0, 1)
    if cfg.loss.matcher.bg_iou > cfg.loss.matcher.fg_iou:
        raise ConfigError(f"loss.matcher.bg_iou={cfg.loss.matcher.bg_iou} must be <= "
                          f"loss.matcher.fg_iou={cfg.loss.matcher.fg_iou}")
    _choice(cfg, "model.net.backbone", RESNETS)
    _choice(cfg, "model.net.norm", NORMS)
    _choice(cfg, "model.net.head_norm", HEAD_NORMS)
    _choice(cfg, "model.net.p6_from", ("c5", "p5"))
    _number(cfg, "model.net.frozen_stages", 0, 5, integer=True)
    _number(cfg, "model.net.prior_prob", 0, 1, lo_open=True)
    _min_size(cfg)
    for key in ("data.eval_min_size", "data.eval_max_size"):  # absent (older configs) or null: the training resize
        _number(cfg, key, 1, integer=True, allow_none=True)
    _number(cfg, "data.size_divisible", 1, integer=True)
    if cfg.data.size_divisible % 32:
        raise ConfigError(f"data.size_divisible={cfg.data.size_divisible} must be a multiple of 32 (the stride of C5)")
    device = str(cfg.device)
    if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise ConfigError(f"device={device!r} must be auto, cpu, cuda or cuda:N")
    if cfg.data.generate is None:
        for key in ("train_ann", "val_ann", "train_images", "val_images"):
            path = Path(str(cfg.data[key]))
            if not path.exists():
                raise ConfigError(f"data.{key}={str(path)!r} does not exist")
