"""``recipe=auto``: the values a user would otherwise get wrong, fitted to the training set before training.

``experiment=own_data`` selects it (``configs/recipe/auto.yaml``) and sets those values to ``auto``; ``resolve``
replaces each one with a choice and its reason, from the statistics of the training set (image sizes,
box sizes and aspect ratios, read from the annotations: nothing is decoded), the device and the run:

- the training resize (``data.min_size`` / ``max_size``): the longer side that keeps the small boxes
  (5th percentile of sqrt(w*h)) at ``recipe.small_box_px`` pixels, between ``recipe.min_side`` and the
  device's cap, never larger than the images (not rounded: the collate pads). When one of the two is given,
  it is kept and the other follows from it: ``max_size`` given, ``min_size = max_size`` (the longer side
  sets the scale); ``min_size`` given, ``max_size`` large enough that the shorter side is ``min_size`` on
  95% of the images (``resize_choices``);
- the anchor scale (``model.anchors.scale``): the multiple of the preset's own anchor sizes (``sizes`` or
  ``sizes_per_level``, whichever it uses) that gives the largest share of boxes an anchor at IoU >=
  ``loss.matcher.fg_iou`` (at least ``recipe.coverage`` when possible, measured on the padded images resized
  as training resizes them, aspect included), the one closest to 1 on ties. The share is the mean over the
  classes of each class's share: COCO AP averages over classes, so a rare class of small objects counts as
  much as a common one of large objects. A detector started from one of our checkpoints
  (``model.init_from``) keeps the anchors its box head was trained on (``trained_anchors``);
- the learning rate and weight decay (``optim.lr`` / ``optim.weight_decay``): from scratch or fine-tuning
  (an ImageNet backbone via ``model.net.weights`` or a whole detector via ``model.init_from``);
- the run length (``trainer.epochs``): with ``trainer.time_limit``, as many steps as fit (null); without,
  enough epochs to see about ``IMAGES_SEEN`` images.

A value given on the command line is not ``auto`` and is never touched. The choices are logged as one
block and kept in the config (``recipe.choices``), hence in ``config.yaml`` and every checkpoint. A resumed run
keeps its checkpoint's choices (``apply(..., resumed=)``): fitted again on another device (whose resize cap
differs) or on other statistics, the resize and anchors would change under trained weights; a value given on the
command line still wins.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from retinanet import distributed
from retinanet.anchors import AnchorGenerator
from retinanet.checkpoint import load_checkpoint
from retinanet.data.coco import CocoDetection
from retinanet.data.statistics import best_anchor_iou, box_statistics
from retinanet.errors import ConfigError, UserError
from retinanet.matcher import Matcher

log = logging.getLogger(__name__)

AUTO = "auto"
SCALES = tuple(2 ** (k / 4) for k in range(-8, 5))  # anchor size multipliers tried: 0.25 .. 2, four a factor of 2
SHORTER_SIDE_SHARE = 95  # min_size given alone: max_size lets the shorter side reach it on this % of the images
IMAGES_SEEN = 20_000  # without a time limit: epochs to see about this many images (COCO's 12 epochs see 1.4M)
EPOCHS_RANGE = (12, 300)
# learning rate and weight decay by optimiser and start; fine-tuning rates are for a batch of 16 (linear scaling)
RATES = {("adamw", "scratch"): (3e-3, 0.05), ("adamw", "pretrained"): (1e-4, 1e-4),
         ("sgd", "scratch"): (0.02, 1e-4), ("sgd", "pretrained"): (0.01, 1e-4)}
PRETRAINED_BATCH = 16


@dataclass
class Choice:
    key: str
    value: object
    reason: str


def is_auto(value) -> bool:
    return isinstance(value, str) and value == AUTO


# the keys recipe=auto can fill in (elsewhere `auto` has meanings of its own: device=auto, trainer.precision=auto)
RECIPE_KEYS = ("data.min_size", "data.max_size", "model.anchors.scale", "optim.lr", "optim.weight_decay",
               "trainer.epochs")


def auto_keys(cfg: DictConfig) -> list[str]:
    """The keys of ``RECIPE_KEYS`` whose value is ``auto``."""
    return [key for key in RECIPE_KEYS if is_auto(OmegaConf.select(cfg, key, default=None))]


def check_selected(cfg: DictConfig) -> None:
    """A value ``auto`` of ``RECIPE_KEYS`` needs recipe=auto (e.g. ``experiment=own_data recipe=none`` leaves some)."""
    if is_auto(OmegaConf.select(cfg, "model.anchors.sizes", default=None)):
        raise ConfigError("model.anchors.sizes=auto: recipe=auto fits model.anchors.scale (a multiple of the "
                          "preset's sizes) instead; set model.anchors.scale=auto")
    left = auto_keys(cfg)
    if left and OmegaConf.select(cfg, "recipe.name", default=None) != "auto":
        raise ConfigError(f"{left[0]}=auto needs recipe=auto, which fits it to the training set: set {left[0]} on "
                          "the command line, or use experiment=own_data (recipe=auto with every such value auto)")


def choose_side(stats: dict, recipe: DictConfig, device: torch.device) -> tuple[int, str]:
    """The longer side of the training resize, and why."""
    cap = int(recipe.max_side_gpu if device.type == "cuda" else recipe.max_side_cpu)
    native = stats["image_longer_side"]
    rel = stats["relative_side_p5"]
    if not math.isfinite(rel) or rel <= 0:
        side, why = min(cap, native), "no boxes to size it by"
    else:
        side = recipe.small_box_px / rel
        why = (f"keeps the small boxes (5th percentile {rel * native:.0f} px of {native:.0f}) at "
               f">= {recipe.small_box_px} px")
        if side < recipe.min_side:
            side, why = recipe.min_side, why.replace("keeps", "already keeps") + f" at the minimum {recipe.min_side}"
        if side > cap:
            side, why = cap, f"capped for the {device.type} (small boxes then {rel * cap:.0f} px)"
    side = int(min(side, native))  # never enlarge the images; no rounding: the collate pads
    if side == int(native):
        why += "; the images' own size"
    return max(32, side), why


def resize_choices(cfg: DictConfig, stats: dict, recipe: DictConfig, device: torch.device,
                   keys: set[str]) -> list[tuple[str, int, str]]:
    """``(key, value, reason)`` for the ``auto`` ones of ``data.min_size`` / ``max_size``: a value given is kept
    and the other follows from it (see the module docstring)."""
    if keys >= {"data.min_size", "data.max_size"}:
        side, why = choose_side(stats, recipe, device)
        return [("data.max_size", side, f"longer side {side}: {why}"),
                ("data.min_size", side, "= max_size: the longer side sets the scale")]
    if "data.min_size" in keys:
        return [("data.min_size", int(cfg.data.max_size), "= the given data.max_size: the longer side sets the scale")]
    given = cfg.data.min_size
    shorter = max(int(v) for v in given) if isinstance(given, (list, tuple)) or OmegaConf.is_list(given) \
        else int(given)
    aspect = stats["image_aspect_p95"] if math.isfinite(stats["image_aspect_p95"]) else 1.0
    longer = int(math.ceil(shorter * aspect))
    return [("data.max_size", longer, f"the given data.min_size {shorter} x {aspect:.3g} (the longer / shorter "
                                      f"side of {SHORTER_SIDE_SHARE}% of the images): that shorter side is kept")]


def fit_anchor_scale(dataset, anchors_cfg: DictConfig, matcher: Matcher, min_size, max_size, size_divisible: int,
                     coverage: float, max_images: int) -> tuple[float, dict, str]:
    """The multiple of the preset's anchor sizes that covers the boxes best at the training resize ``min_size`` /
    ``max_size`` (see the module docstring): (scale, coverage per scale tried, why)."""
    params = {k: v for k, v in OmegaConf.to_container(anchors_cfg, resolve=True).items()
              if k not in ("_target_", "scale")}
    results, worst = {}, {}
    for m in SCALES:
        gen = AnchorGenerator(**params, scale=m)
        iou, labels = best_anchor_iou(dataset, gen, min_size, max_size, size_divisible, max_images,
                                      with_labels=True)
        per_class = [float((iou[labels == k] >= matcher.fg_iou).mean()) for k in np.unique(labels)]
        results[m] = float(np.mean(per_class)) if per_class else 0.0
        worst[m] = min(per_class) if per_class else 0.0
    best = max(results.values())
    target = coverage if best >= coverage else best - 0.005
    good = [m for m, c in results.items() if c >= target]
    m = min(good, key=lambda s: (abs(math.log(s)), -s))
    preset = anchor_range(AnchorGenerator(**params))
    why = (f"anchors {anchor_range(AnchorGenerator(**params, scale=m))} px: {results[m]:.1%} of each class's boxes "
           f"have an anchor at IoU >= {matcher.fg_iou} (class mean; worst class {worst[m]:.1%}; {results[1.0]:.1%} "
           f"with the preset's own {preset})")
    return round(m, 4), {f"{k:.3g}": round(v, 4) for k, v in results.items()}, why


def anchor_range(gen: AnchorGenerator) -> str:
    """``32-812``: the smallest and largest anchor side (sqrt of its area) of a generator."""
    sides = [v for level in gen.sizes_per_level for v in level]
    return f"{min(sides):.4g}-{max(sides):.4g}"


def trained_anchors(cfg: DictConfig) -> tuple[dict | None, str] | None:
    """When ``model.init_from`` is a trained detector: (the anchors config its box head was trained on, or None
    for the preset's own, why); None otherwise. Rescaling them would move every box the head predicts."""
    source = cfg.model.get("init_from")
    if not source:
        return None
    if os.path.isfile(str(source)):
        try:
            ckpt = load_checkpoint(source)
        except UserError:  # not one of ours (a torchvision .pth): model.init_from reports what it loads
            ckpt = {}
        anchors = (ckpt.get("config") or {}).get("model", {}).get("anchors") if isinstance(ckpt, dict) else None
        if anchors:
            return dict(anchors), (f"kept from model.init_from={source}: its box head was trained on these anchors "
                                   "(rescaling them would move every box it predicts)")
    return None, (f"the preset's own: model.init_from={source} is a trained detector whose box head was trained "
                  "on its anchors (rescaling them would move every box it predicts)")


def pretrained(cfg: DictConfig) -> bool:
    return bool(cfg.model.get("init_from")) or bool(cfg.model.net.get("weights"))


def resolve(cfg: DictConfig, train_set: CocoDetection, device: torch.device, only: set[str] | None = None,
            world_size: int | None = None) -> list[Choice]:
    """Replace every ``auto`` value of ``cfg`` (in place; ``only``: of these keys) and return the choices with
    their reasons. ``world_size``: the processes the batch is split over (None: this run's, ``distributed.info``);
    the fine-tuning rate scales with the global batch."""
    keys = set(auto_keys(cfg)) & (only if only is not None else set(auto_keys(cfg)))
    if not keys:
        return []
    check_selected(cfg)
    recipe = cfg.recipe
    choices: list[Choice] = []
    stats = box_statistics(train_set, recipe.max_images)

    def choose(key: str, value, reason: str) -> None:
        with open_dict(cfg):
            OmegaConf.update(cfg, key, value, merge=False)
        choices.append(Choice(key, value, reason))

    if keys & {"data.min_size", "data.max_size"}:
        for key, value, why in resize_choices(cfg, stats, recipe, device, keys):
            choose(key, value, why)
    if "model.anchors.scale" in keys:
        trained = trained_anchors(cfg)
        if trained is not None:
            anchors, why = trained
            if anchors is not None:
                with open_dict(cfg):
                    cfg.model.anchors = anchors
            value = OmegaConf.select(cfg, "model.anchors.scale", default=1.0)
            choose("model.anchors.scale", 1.0 if is_auto(value) or value is None else value, why)
        else:
            matcher = Matcher(fg_iou=cfg.loss.matcher.fg_iou, bg_iou=cfg.loss.matcher.bg_iou)
            scale, _, why = fit_anchor_scale(train_set, cfg.model.anchors, matcher, cfg.data.min_size,
                                             cfg.data.max_size, int(cfg.data.size_divisible),
                                             float(recipe.coverage), recipe.max_images)
            choose("model.anchors.scale", scale, why)
    start = "pretrained" if pretrained(cfg) else "scratch"
    name = str(cfg.optim.get("_target_", "")).rsplit(".", 1)[-1]
    if keys & {"optim.lr", "optim.weight_decay"}:
        if (name, start) not in RATES:
            raise ConfigError(f"optim.lr=auto: no rule for optimiser {name!r}; set optim.lr")
        lr, wd = RATES[(name, start)]
        what = "fine-tuning a pretrained backbone" if start == "pretrained" else "training from scratch"
        if "optim.lr" in keys:
            scale = ""
            if start == "pretrained" and cfg.optim.get("reference_batch_size") is None:
                processes = distributed.info().world_size if world_size is None else int(world_size)
                per_step = cfg.trainer.batch_size * cfg.trainer.accumulate_grad_batches
                batch = per_step * processes
                lr = lr * batch / PRETRAINED_BATCH
                scale = (f" ({RATES[(name, start)][0]:g} per {PRETRAINED_BATCH} images, linear in the global batch of "
                         f"{batch}: {processes} process(es) x {cfg.trainer.batch_size} x "
                         f"{cfg.trainer.accumulate_grad_batches} accumulated)")
            choose("optim.lr", float(f"{lr:.3g}"), f"{name} {what}{scale}")
        if "optim.weight_decay" in keys:
            choose("optim.weight_decay", wd, f"{name} {what}")
    if "trainer.epochs" in keys:
        if cfg.trainer.time_limit:
            choose("trainer.epochs", None, f"trainer.time_limit={cfg.trainer.time_limit:g}s: as many steps as fit")
        else:
            epochs = int(np.clip(math.ceil(IMAGES_SEEN / max(1, len(train_set))), *EPOCHS_RANGE))
            choose("trainer.epochs", epochs, f"about {IMAGES_SEEN} images seen ({len(train_set)} a pass), "
                                             f"within {EPOCHS_RANGE[0]}-{EPOCHS_RANGE[1]} epochs")
    with open_dict(cfg):
        cfg.recipe.choices = {c.key: {"value": c.value, "reason": c.reason} for c in choices}
        cfg.recipe.statistics = {k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()}
    return choices


def reuse(cfg: DictConfig, recorded, source: str) -> list[Choice]:
    """Every ``auto`` value of ``cfg`` that a resumed run chose (``recorded``: its ``recipe.choices``) set to that
    choice, in place, the reason saying so; the values left ``auto`` (not chosen then) are for ``resolve``."""
    kept = []
    for key in auto_keys(cfg):
        if key in (recorded or {}):
            value, reason = recorded[key]["value"], recorded[key]["reason"]
            with open_dict(cfg):
                OmegaConf.update(cfg, key, value, merge=False)
            kept.append(Choice(key, value, f"kept from {source}, fitted then: {reason}"))
    return kept


def apply(cfg: DictConfig, device: torch.device, only: set[str] | None = None, resumed: dict | None = None
          ) -> list[Choice]:
    """``resolve`` on the training set of ``cfg.data`` (read once, without images) and log the choices.

    ``resumed``: ``{"path": the checkpoint resumed, "recipe": its config's recipe}``: its ``choices`` are kept
    (``reuse``), not fitted again on this device; only values it did not choose are fitted."""
    if not auto_keys(cfg):
        return []
    recorded = dict((resumed or {}).get("recipe") or {})
    kept = reuse(cfg, recorded.get("choices"), f"the resumed run ({resumed['path']})") if resumed else []
    choices = []
    if auto_keys(cfg):
        train_set = CocoDetection(cfg.data.train_ann, cfg.data.train_images, on_error=cfg.data.get("on_error", "raise"))
        choices = resolve(cfg, train_set, device, only)
    if kept:
        with open_dict(cfg):
            cfg.recipe.choices = {c.key: {"value": c.value, "reason": c.reason} for c in kept + choices}
            if not choices and recorded.get("statistics") is not None:
                cfg.recipe.statistics = recorded["statistics"]
    log.info("%s", describe(kept + choices))
    return kept + choices


def describe(choices: list[Choice]) -> str:
    """The log block: one line per choice."""
    lines = ["recipe=auto fitted to the training set (set any of these on the command line to change it):"]
    width = max(len(c.key) for c in choices)
    for c in choices:
        lines.append(f"  {c.key:<{width}} = {c.value}  ({c.reason})")
    return "\n".join(lines)
