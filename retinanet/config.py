"""The composed training config: what no constructor owns is checked here, everything else by its constructor.

- ``validate_train_config``: the keys the trainer itself reads (``trainer.*``, ``data.*``, ``device``,
  ``seed``), unknown keys anywhere outside the instantiated groups (``+trainer.epoch=3`` is refused,
  not ignored), and the data paths. One ``ConfigError`` naming the key and value, before any work.
- ``build(node, **kwargs)``: ``hydra.utils.instantiate`` for the groups with a ``_target_`` (model,
  loss, optim, schedule, postprocess, ...): each constructor checks its own arguments, and its
  ``ValueError`` / unknown keyword comes back as a ``ConfigError`` naming the group and the key.
- ``compose_config`` / ``load_preset``: a config or one preset as the commands compose it, outside a
  command (a preset's file alone lacks what its defaults list inherits: ``model/anchors``, ...).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from retinanet.errors import ConfigError
from retinanet.recipe import check_selected
from retinanet.runtime import PRECISIONS

CONFIGS = Path(__file__).resolve().parent / "configs"  # the Hydra config tree (package data; pkg://retinanet.configs)
# top-level groups whose nodes are built by their _target_ (their constructors check their own keys)
BUILT_GROUPS = ("loss", "optim", "schedule", "postprocess")


def compose_config(overrides=(), config_name: str = "train") -> DictConfig:
    """``configs/<config_name>.yaml`` with these overrides, as its command composes it (Hydra's compose API)."""
    if GlobalHydra.instance().is_initialized():  # inside a command or an initialize() block: its config tree
        return compose(config_name=config_name, overrides=list(overrides))
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def load_preset(group: str, name: str) -> DictConfig:
    """``configs/<group>/<name>.yaml`` with what its defaults list inherits, as training composes it (a plain,
    detached copy: relative interpolations such as data's ``${.root}`` resolve within it)."""
    return OmegaConf.create(OmegaConf.to_container(compose_config([f"{group}={name}"])[group], resolve=False))


def build(node, **kwargs):
    """Instantiate a config node; a constructor's complaint becomes a ``ConfigError`` naming group and key."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        found = re.search(r"full_key: (\S+)", str(err))
        key = found.group(1) if found else (node._get_full_key(None) if isinstance(node, DictConfig) else "config")
        cause = err.__cause__
        target = node.get("_target_") if isinstance(node, (dict, DictConfig)) else None
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(cause)) if cause is not None else None
        if unknown:
            raise ConfigError(f"{key}.{unknown.group(1)} is not a setting of {key} ({target} does not take it): "
                              "check the spelling or remove it") from None
        if isinstance(cause, ImportError):
            raise ConfigError(f"{key}._target_={target!r} cannot be imported: {cause}") from None
        if isinstance(cause, (ValueError, TypeError, FileNotFoundError)):
            raise ConfigError(f"{key}: {cause}") from None
        raise


# what to set when a mandatory key is missing (the others are paths: data.train_ann, data.root, ...)
MANDATORY_EXAMPLES = {
    "data.min_size": "data.min_size=512 data.max_size=512, or use experiment=own_data (recipe=auto fits the resize "
                     "to the training set)",
    "data.max_size": "data.max_size=512, or use experiment=own_data (recipe=auto fits the resize to the training set)",
}


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


def _keys(node, prefix: str = "") -> set[str]:
    """Dotted keys of a plain config tree; a node with a ``_target_`` counts as one key (its constructor checks
    the rest)."""
    keys = set()
    for k, v in node.items():
        key = f"{prefix}{k}"
        keys.add(key)
        if isinstance(v, dict) and "_target_" not in v:
            keys |= _keys(v, key + ".")
    return keys


@lru_cache(maxsize=None)
def known_keys(group: str) -> frozenset[str]:
    """Every key the presets of a config group define: the keys the code reads.

    The union over ``configs/<group>/*.yaml`` (a preset that inherits another adds only its own keys) and over
    the nested groups ``configs/<group>/<sub>/`` (e.g. ``data/augment/``), whose keys sit under ``<sub>.``."""
    keys: set[str] = set()
    folder = CONFIGS / group
    for path in sorted(folder.glob("*.yaml")):
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        data.pop("defaults", None)
        keys |= _keys(data)
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        keys |= {sub.name} | {f"{sub.name}.{key}" for key in known_keys(f"{group}/{sub.name}")}
    return frozenset(keys)


def check_unknown_keys(cfg: DictConfig) -> None:
    """Refuse keys no component reads: e.g. ``+trainer.epoch=3`` (Hydra accepts a new key with ``+``)."""
    for group in ("trainer", "data", "evaluation", "logger"):
        if group not in cfg:  # logger=[]: no logger
            continue
        present = _keys(OmegaConf.to_container(cfg[group], resolve=False))
        unknown = sorted(present - known_keys(group))
        if unknown:
            raise ConfigError(f"{group}.{unknown[0]} is not a setting of {group} (nothing reads it): check the "
                              f"spelling; `retinanet-train --cfg job` lists every key")
    top = set(cfg.keys()) - {"trainer", "data", "model", "recipe", "evaluation", "logger", *BUILT_GROUPS} - \
        {"seed", "device"}
    if top:
        raise ConfigError(f"{sorted(top)[0]} is not a setting of the training config (nothing reads it)")
    model_keys = set(cfg.model.keys()) - {"name", "init_from", "net", "anchors"}
    if model_keys:
        raise ConfigError(f"model.{sorted(model_keys)[0]} is not a setting of model (nothing reads it)")


def _train_loop(cfg: DictConfig) -> None:
    """Keys of scaling out and of never losing a run (accumulation, resume, checkpoints, EMA, ...)."""
    _number(cfg, "trainer.accumulate_grad_batches", 1, integer=True)
    _number(cfg, "trainer.checkpoint_every_steps", 0, integer=True)
    _number(cfg, "trainer.keep_last", 0, integer=True)
    _number(cfg, "trainer.max_bad_steps", 0, integer=True)
    _number(cfg, "trainer.ema.decay", 0, 1, allow_none=True, lo_open=True)
    if cfg.trainer.ema.decay is not None and cfg.trainer.ema.decay >= 1:
        raise ConfigError(f"trainer.ema.decay={cfg.trainer.ema.decay} must be < 1 (e.g. 0.9998), or null for no EMA")
    for key in ("aspect_ratio_grouping", "sync_bn", "deterministic", "channels_last", "compile"):
        if not isinstance(cfg.trainer[key], bool):
            raise ConfigError(f"trainer.{key}={cfg.trainer[key]!r} must be true or false")
    if cfg.trainer.progress not in (True, False, "auto"):
        raise ConfigError(f"trainer.progress={cfg.trainer.progress!r} must be auto, true or false")
    _number(cfg, "trainer.log_every_seconds", 0, lo_open=True)
    resume = cfg.trainer.resume
    if resume is not None and not isinstance(resume, str):
        raise ConfigError(f"trainer.resume={resume!r} must be null, auto or the path of a checkpoint")
    if resume not in (None, "auto") and not Path(resume).is_file():
        raise ConfigError(f"trainer.resume={resume!r} does not exist; give a checkpoint file (last.pt), "
                          "auto (the run dir's last.pt if any) or null")


def validate_evaluation_config(cfg: DictConfig) -> None:
    """``evaluation.*`` (training and retinanet-evaluate): a known, installed backend and sane picture settings."""
    from retinanet.evaluation import check_backend  # imported late: pycocotools

    check_backend(str(cfg.evaluation.backend))
    if not isinstance(cfg.evaluation.plots.enabled, bool):
        raise ConfigError(f"evaluation.plots.enabled={cfg.evaluation.plots.enabled!r} must be true or false")
    _number(cfg, "evaluation.plots.score_thresh", 0, 1)
    _number(cfg, "evaluation.plots.iou_thresh", 0, 1, lo_open=True)
    _number(cfg, "evaluation.plots.num_images", 0, integer=True)


def _min_size(cfg: DictConfig) -> None:
    """``data.min_size``: a number of pixels, or a list of them (multi-scale training)."""
    sizes = cfg.data.min_size
    values = list(sizes) if OmegaConf.is_list(sizes) else [sizes]
    shown = OmegaConf.to_object(sizes) if OmegaConf.is_list(sizes) else sizes
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ConfigError(f"data.min_size={shown!r} must be a positive integer or a non-empty list of them "
                          "(multi-scale training: each training image draws its shorter side from the list)")
    _number(cfg, "data.max_size", max(values), integer=True)


def _is_auto(cfg: DictConfig, key: str) -> bool:
    return OmegaConf.select(cfg, key) == "auto"


def validate_train_config(cfg: DictConfig, allow_auto: bool = False) -> None:
    """Raise ``ConfigError`` naming the key and value of the first problem found in what the trainer reads.

    ``allow_auto``: values ``auto`` pass (``recipe=auto`` replaces them before training; then this runs again)."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        raise ConfigError(f"{err.full_key} is mandatory for this preset: set it on the command line, e.g. "
                          f"{MANDATORY_EXAMPLES.get(err.full_key, err.full_key + '=/path/to/...')}") from None
    except InterpolationResolutionError as err:
        raise ConfigError(f"cannot resolve {err.full_key}: {err.msg}") from None
    check_unknown_keys(cfg)
    check_selected(cfg)  # an `auto` left without recipe=auto
    skip = (lambda key: allow_auto and _is_auto(cfg, key))
    if not skip("trainer.epochs"):
        _number(cfg, "trainer.epochs", 1, integer=True, allow_none=True)
    _number(cfg, "trainer.time_limit", 0, allow_none=True, lo_open=True)
    if cfg.trainer.epochs is None and cfg.trainer.time_limit is None:
        raise ConfigError("trainer.epochs=null needs trainer.time_limit (the run then plans its length from its "
                          "pace to fill the time): set one of them")
    _number(cfg, "trainer.batch_size", 1, integer=True)
    _number(cfg, "trainer.eval_batch_size", 1, integer=True)
    _number(cfg, "trainer.num_workers", 0, integer=True)
    _number(cfg, "trainer.eval_every", 0, integer=True)
    _number(cfg, "trainer.log_every", 1, integer=True)
    _number(cfg, "trainer.grad_clip", 0, allow_none=True, lo_open=True)
    _number(cfg, "trainer.threads", 1, integer=True, allow_none=True)
    _choice(cfg, "trainer.precision", PRECISIONS)
    _train_loop(cfg)
    validate_evaluation_config(cfg)
    if not (skip("data.min_size") or skip("data.max_size")):
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
