"""``model.init_from``: start a model from any RetinaNet checkpoint, loading every tensor that fits.

Sources: a checkpoint of this project (``{"model": state_dict, ...}``), a bare state dict in our
layout, a torchvision RetinaNet ``.pth`` (raw or under ``"model"``, as torchvision's reference
scripts save it), or a torchvision weights name such as ``RetinaNet_ResNet50_FPN_Weights.COCO_V1``.

Every model tensor whose name and shape match is loaded; the rest keeps its initialisation. The
class predictor, when it does not fit (another class count), is re-initialised explicitly: weights
``N(0, 0.01)`` and bias ``-log((1 - prior) / prior)``, the paper's start. The log lists what was
loaded (per module), skipped (with the reason) and re-initialised; the returned ``InitReport``
holds the full lists.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from retinanet.checkpoint import CheckpointError, read_state_dict
from retinanet.errors import UserError
from retinanet.model.head import prior_logit
from retinanet.torchvision_weights import (
    convert_torchvision_state_dict,
    is_torchvision_state_dict,
    load_torchvision_state_dict,
    torchvision_variant,
)

log = logging.getLogger(__name__)


class InitFromError(UserError):
    """``model.init_from`` names no readable checkpoint, or one of which nothing fits the model."""


CLASS_PREDICTOR = ("cls_head.predictor.weight", "cls_head.predictor.bias")


@dataclass
class InitReport:
    """What ``init_from`` did: model keys loaded, checkpoint keys skipped (with why), keys re-initialised."""

    source: str
    kind: str  # "ours" or "torchvision v1" / "torchvision v2"
    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # checkpoint key -> reason
    reinitialised: list[str] = field(default_factory=list)
    not_in_checkpoint: list[str] = field(default_factory=list)  # model keys kept at their initialisation


def source_state_dict(source: str) -> tuple[dict[str, Tensor], str]:
    """Our-layout state dict and its kind from a checkpoint path or a torchvision weights name."""
    if not os.path.exists(source):
        if re.fullmatch(r"RetinaNet_\w+_Weights\.\w+", str(source)):
            state = load_torchvision_state_dict(source)
        else:
            raise InitFromError(f"model.init_from={source!r}: no such file (expected a checkpoint or a "
                                "torchvision weights name like RetinaNet_ResNet50_FPN_Weights.COCO_V1)")
    else:
        try:
            state = read_state_dict(source)  # our checkpoints: the weights that scored (EMA)
        except CheckpointError as err:
            raise InitFromError(f"model.init_from={source!r}: {err}") from None
    if is_torchvision_state_dict(state):
        return convert_torchvision_state_dict(state, strict=False), f"torchvision {torchvision_variant(state)}"
    return state, "ours"


def _group(keys: list[str]) -> str:
    """``backbone.layer1 (60), fpn.lateral (6), ...``: module prefixes with their tensor counts."""
    counts = Counter(".".join(k.split(".")[:2]) for k in keys)
    return ", ".join(f"{prefix} ({n})" for prefix, n in counts.items())


@torch.no_grad()
def reinit_class_predictor(model: nn.Module, prior_prob: float) -> None:
    """Weights ``N(0, 0.01)``, bias at the prior's logit: every anchor starts at probability ``prior_prob``."""
    predictor = model.cls_head.predictor
    nn.init.normal_(predictor.weight, std=0.01)
    nn.init.constant_(predictor.bias, prior_logit(prior_prob))


def init_from(model: nn.Module, source: str, prior_prob: float | None = None) -> InitReport:
    """Load into ``model`` every tensor of ``source`` whose name and shape fit; log and return what happened.

    ``prior_prob`` (default: ``model.prior_prob``, else 0.01) is used when the class predictor is
    re-initialised. Raises ``InitFromError`` (a ``UserError``) when nothing at all fits (wrong architecture or
    file); torchvision keys without a counterpart here are reported as skipped.
    """
    source = str(source)
    state, kind = source_state_dict(source)
    report = InitReport(source, kind)
    target = model.state_dict()
    to_load = {}
    for key, value in target.items():
        if key not in state:
            report.not_in_checkpoint.append(key)
        elif state[key].shape != value.shape:
            report.skipped[key] = (f"shape {tuple(state[key].shape)} in the checkpoint, "
                                   f"{tuple(value.shape)} in the model")
        else:
            to_load[key] = state[key]
            report.loaded.append(key)
    for key in state:
        if key not in target:
            report.skipped[key] = "not in the model"
    if not to_load:
        raise InitFromError(f"model.init_from={source!r} ({kind}): no tensor fits this model; checkpoint keys start "
                         f"{list(state)[:3]}, model keys {list(target)[:3]}")
    model.load_state_dict(to_load, strict=False)

    if any(k in report.skipped for k in CLASS_PREDICTOR):
        prior = prior_prob if prior_prob is not None else getattr(model, "prior_prob", 0.01)
        reinit_class_predictor(model, prior)
        report.reinitialised = list(CLASS_PREDICTOR)
        log.info("init_from %s: re-initialised %s (weights N(0, 0.01), bias %.4f = prior %g): %s",
                 source, ", ".join(CLASS_PREDICTOR), prior_logit(prior), prior, report.skipped[CLASS_PREDICTOR[0]])
    log.info("init_from %s (%s): loaded %d of %d model tensors: %s", source, kind, len(report.loaded), len(target),
             _group(report.loaded))
    log.debug("init_from %s: loaded %s", source, report.loaded)
    if report.skipped:
        counters = [k for k in report.skipped if k.endswith("num_batches_tracked")]  # BN step counters: unused here
        listed = [f"{k} ({why})" for k, why in report.skipped.items() if k not in counters]
        if counters:
            listed.append(f"{len(counters)} BatchNorm num_batches_tracked counters (not in the model)")
        log.info("init_from %s: skipped %d checkpoint tensors: %s", source, len(report.skipped), "; ".join(listed))
    if report.not_in_checkpoint:
        log.info("init_from %s: %d model tensors not in the checkpoint, kept as initialised: %s", source,
                 len(report.not_in_checkpoint), ", ".join(report.not_in_checkpoint))
    return report
