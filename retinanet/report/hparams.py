"""A run's hyperparameters and the final numbers they are judged by, as every logger records them.

``hparams_of(cfg)``: every setting of the built groups of ``HPARAM_GROUPS``, the keys of ``HPARAM_KEYS`` and
every command-line override (a config group chosen on the command line appears with the chosen name);
``final_metrics(metrics)``: the COCO numbers and the validation loss of the final evaluation.
"""

from __future__ import annotations

from omegaconf import DictConfig, ListConfig, OmegaConf

from retinanet.evaluation import STAT_NAMES

# shown in the HParams tab of every run: every setting of these built groups (whatever their _target_ takes) ...
HPARAM_GROUPS = ("loss", "optim", "schedule")
# ... and these keys of the run (missing keys are left out)
HPARAM_KEYS = ("trainer.batch_size", "trainer.epochs", "trainer.time_limit", "model.name", "data.name",
               "data.min_size", "seed")


def _hparam_value(value):
    """A hyperparameter value: numbers and strings as they are, anything else (null, lists) as text."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float, str)):
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    return "null" if value is None else str(value)


def _override_items() -> list[tuple[str, str]]:
    """``(key, value text)`` of the command-line overrides of the running Hydra job ([] outside Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = HydraConfig.get().overrides.task
    except (ImportError, ValueError):
        return []
    items = []
    for text in overrides:
        key, _, value = str(text).partition("=")
        if key.startswith("~") or key.lstrip("+").startswith("hydra."):
            continue
        items.append((key.lstrip("+"), value))
    return items


def _leaves(node, prefix: str) -> dict:
    """``{dotted key: value}`` of every scalar setting under a config node (``_target_`` as the class name)."""
    out = {}
    for k, v in node.items():
        key = f"{prefix}.{k}"
        if isinstance(v, DictConfig):
            out.update(_leaves(v, key))
        elif k == "_target_":
            out[key] = str(v).rsplit(".", 1)[-1]
        else:
            out[key] = _hparam_value(v)
    return out


def hparams_of(cfg: DictConfig, keys=HPARAM_KEYS, groups=HPARAM_GROUPS) -> dict:
    """``{dotted key: value}`` for every setting of ``groups``, ``keys`` and every command-line override;
    config groups chosen on the command line (``model=retinanet_r50``) appear with the chosen name."""
    absent = object()
    out = {}
    for group in groups:
        if isinstance(cfg.get(group), DictConfig):
            out.update(_leaves(cfg[group], group))
    for key in keys:
        value = OmegaConf.select(cfg, key, default=absent)
        if value is not absent:
            out[key] = _hparam_value(value)
    for key, text in _override_items():
        value = OmegaConf.select(cfg, key, default=absent)
        out[key] = text if value is absent or isinstance(value, DictConfig) else _hparam_value(value)
    return out


def final_metrics(metrics: dict | None) -> dict[str, float]:
    """``{AP: .., AP50: .., ..., val_loss: ..}`` of an ``evaluate`` result (numbers COCOeval had nothing to score
    for left out; None: {})."""
    stats = (metrics or {}).get("stats", {})
    out = {name: float(stats[name]) for name in STAT_NAMES if stats.get(name) is not None}
    val_loss = (metrics or {}).get("loss", {}).get("loss")
    if val_loss is not None:
        out["val_loss"] = float(val_loss)
    return out
