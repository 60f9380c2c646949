"""torchvision's RetinaNet weights (``retinanet_resnet50_fpn`` v1 and ``_v2``) in this project's layout.

torchvision key                                    this project
``backbone.body.<resnet>``                         ``backbone.<resnet>``
``backbone.fpn.inner_blocks.{i}[.0].*``            ``fpn.lateral.{i}.*``
``backbone.fpn.layer_blocks.{i}[.0].*``            ``fpn.output.{i}.*``
``backbone.fpn.extra_blocks.p6 / p7.*``            ``fpn.extra.0 / 1.*``
``head.classification_head.conv.{i}.0.*`` (conv)   ``cls_head.tower.{n i}.*`` (n = 2, or 3 with GroupNorm)
``head.classification_head.conv.{i}.1.*`` (GN)     ``cls_head.tower.{3 i + 1}.*``
``head.classification_head.cls_logits.*``          ``cls_head.predictor.*``
``head.regression_head.*`` (``bbox_reg``)          ``box_head.*`` (``predictor``)

Old torchvision files (the v1 COCO weights among them) name the head convs ``conv.{2 i}.*`` and
the FPN convs ``inner_blocks.{i}.*``; both spellings are accepted. The class order of every
anchor is kept; ``keep_classes`` selects (and orders) a subset, e.g. the 80 real COCO categories
out of torchvision's 91 outputs (index = COCO category id, 0 = background, 10 "N/A" gaps).

Command line: ``python -m retinanet.torchvision_weights SOURCE OUT.pt`` writes a checkpoint of this project
(``model``; ``config`` = the matching ``model`` preset plus torchvision's evaluation settings;
``label_map``) from a local ``.pth`` or a weights name such as ``RetinaNet_ResNet50_FPN_Weights.COCO_V1``
(downloaded by torchvision); ``retinanet-evaluate checkpoint=OUT.pt`` then evaluates it.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from retinanet.checkpoint import CheckpointError, read_state_dict
from retinanet.errors import UserError

log = logging.getLogger(__name__)


class ConversionError(UserError):
    """torchvision weights that cannot be read, found or mapped; the message names the file / key."""


TORCHVISION_WEIGHTS = {
    "v1": "RetinaNet_ResNet50_FPN_Weights.COCO_V1",  # COCO val2017 box AP 36.4
    "v2": "RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1",  # COCO val2017 box AP 41.5
}
PRESETS = {"v1": "torchvision_v1", "v2": "torchvision_v2"}  # configs/model/<preset>.yaml

_PLAIN_RULES = [  # (pattern, replacement) for every key outside the head towers
    (r"backbone\.body\.(.+)", r"backbone.\1"),
    (r"backbone\.fpn\.inner_blocks\.(\d+)\.(?:0\.)?(weight|bias)", r"fpn.lateral.\1.\2"),
    (r"backbone\.fpn\.layer_blocks\.(\d+)\.(?:0\.)?(weight|bias)", r"fpn.output.\1.\2"),
    (r"backbone\.fpn\.extra_blocks\.p6\.(weight|bias)", r"fpn.extra.0.\1"),
    (r"backbone\.fpn\.extra_blocks\.p7\.(weight|bias)", r"fpn.extra.1.\1"),
    (r"head\.classification_head\.cls_logits\.(weight|bias)", r"cls_head.predictor.\1"),
    (r"head\.regression_head\.bbox_reg\.(weight|bias)", r"box_head.predictor.\1"),
]
_HEADS = {"classification": "cls_head", "regression": "box_head"}
_TOWER_NEW = re.compile(r"head\.(classification|regression)_head\.conv\.(\d+)\.([01])\.(weight|bias)")
_TOWER_OLD = re.compile(r"head\.(classification|regression)_head\.conv\.(\d+)\.(weight|bias)")


def coco_label_map() -> dict[str, list]:
    """The 80 COCO categories among torchvision's 91 outputs: ``class_names`` and ``category_ids``.

    torchvision's output index is the COCO category id, so ``category_ids`` doubles as the
    ``keep_classes`` that turns a 91-output head into an 80-class one in sorted category-id order
    (the label order of ``retinanet.data.CocoDetection``).
    """
    from torchvision.models.detection.retinanet import _COCO_CATEGORIES

    ids = [i for i, name in enumerate(_COCO_CATEGORIES) if name not in ("__background__", "N/A")]
    return {"class_names": [_COCO_CATEGORIES[i] for i in ids], "category_ids": ids}


def is_torchvision_state_dict(state: Mapping[str, Tensor]) -> bool:
    """True for a torchvision ``RetinaNet`` state dict (``backbone.body.*`` / ``head.*_head.*`` keys)."""
    return any(k.startswith(("backbone.body.", "head.classification_head.", "head.regression_head.")) for k in state)


def torchvision_variant(state: Mapping[str, Tensor]) -> str:
    """``"v2"`` when the heads have GroupNorm (``retinanet_resnet50_fpn_v2``), else ``"v1"``."""
    return "v2" if "head.classification_head.conv.0.1.weight" in state else "v1"


def load_torchvision_state_dict(source: str) -> dict[str, Tensor]:
    """A torchvision RetinaNet state dict from a local file or a weights name (``..._Weights.COCO_V1``)."""
    if os.path.exists(source):
        try:
            state = read_state_dict(source)
        except CheckpointError as err:
            raise ConversionError(str(err)) from None
    elif re.fullmatch(r"RetinaNet_\w+_Weights\.\w+", source):
        from torchvision.models import get_weight

        try:
            weights = get_weight(source)
        except (ValueError, KeyError, AttributeError) as err:
            raise ConversionError(f"{source!r} is not a torchvision weights name; known: "
                                  f"{sorted(TORCHVISION_WEIGHTS.values())}") from err
        try:
            state = weights.get_state_dict(progress=True, check_hash=True)
        except Exception as err:  # noqa: BLE001 - offline machines end up here
            raise ConversionError(f"cannot download {source} from {weights.url} ({type(err).__name__}: {err}); "
                                  "download that file where the internet is reachable and pass its local path") from err
    else:
        raise ConversionError(f"{source!r}: no such file, and not a torchvision weights name like "
                              f"{TORCHVISION_WEIGHTS['v1']!r}")
    if not is_torchvision_state_dict(state):
        raise ConversionError(f"{source!r} is not a torchvision RetinaNet state dict (no 'backbone.body.*' or "
                              f"'head.*' keys; first keys: {list(state)[:3]})")
    return state


def _tower_key(key: str, gn: bool) -> str | None:
    """Our name for a head-tower key, or None when ``key`` is not one."""
    m = _TOWER_NEW.fullmatch(key)
    if m:
        head, layer, part, kind = m.groups()
        index = int(layer) * (3 if gn else 2) + int(part)  # tower = [conv, (GN), ReLU] * depth
        return f"{_HEADS[head]}.tower.{index}.{kind}"
    m = _TOWER_OLD.fullmatch(key)
    if m and not gn:  # old files: conv.{2i} in a Sequential of [conv, ReLU] * depth, as ours
        head, index, kind = m.groups()
        return f"{_HEADS[head]}.tower.{index}.{kind}"
    return None


def select_classes(weight: Tensor, bias: Tensor, keep: Sequence[int], num_anchors: int) -> tuple[Tensor, Tensor]:
    """Keep the outputs ``keep`` (in that order) of every anchor of a class predictor ``[A*K, C, 3, 3]``."""
    num_classes = weight.shape[0] // num_anchors
    keep_t = torch.as_tensor(list(keep), dtype=torch.int64)
    if keep_t.numel() == 0 or int(keep_t.min()) < 0 or int(keep_t.max()) >= num_classes:
        raise ConversionError(f"keep_classes {list(keep)[:10]}... must index the {num_classes} classes "
                              "of the checkpoint")
    rows = (torch.arange(num_anchors)[:, None] * num_classes + keep_t[None, :]).reshape(-1)  # [A, K'] -> [A*K']
    return weight[rows].clone(), bias[rows].clone()


def convert_torchvision_state_dict(state: Mapping[str, Tensor], keep_classes: Sequence[int] | None = None,
                                   strict: bool = True) -> OrderedDict[str, Tensor]:
    """Rename a torchvision RetinaNet state dict to this project's keys (v1 or v2, old or new spelling).

    A key with no counterpart here raises ``ConversionError`` listing them all (``strict``), or is
    passed through under its own name (``strict=False``, for partial loading by ``init_from``).
    """
    gn = torchvision_variant(state) == "v2"
    out: OrderedDict[str, Tensor] = OrderedDict()
    unknown = []
    for key, value in state.items():
        new = _tower_key(key, gn)
        if new is None:
            for pattern, repl in _PLAIN_RULES:
                if re.fullmatch(pattern, key):
                    new = re.sub(pattern, repl, key)
                    break
        if new is None:
            unknown.append(key)
        out[new or key] = value
    if unknown and strict:
        raise ConversionError(f"{len(unknown)} torchvision keys have no counterpart in this project's RetinaNet: "
                              f"{unknown[:10]}")
    if keep_classes is not None:
        num_anchors = out["box_head.predictor.weight"].shape[0] // 4
        out["cls_head.predictor.weight"], out["cls_head.predictor.bias"] = select_classes(
            out["cls_head.predictor.weight"], out["cls_head.predictor.bias"], keep_classes, num_anchors)
    return out


def load_torchvision_weights(model: nn.Module, source: str | Mapping[str, Tensor],
                             keep_classes: Sequence[int] | None = None) -> str:
    """Load torchvision weights (path, weights name or state dict) into ``model``, strictly.

    Returns the variant (``"v1"`` / ``"v2"``). Any missing, unexpected or mis-shaped tensor is a
    ``ConversionError`` naming the keys and the preset that fits (``model=torchvision_v1`` / ``_v2``).
    """
    name = source if isinstance(source, str) else "state dict"
    state = load_torchvision_state_dict(source) if isinstance(source, str) else source
    variant = torchvision_variant(state)
    ours = convert_torchvision_state_dict(state, keep_classes)
    target = model.state_dict()
    missing = [k for k in target if k not in ours and not k.endswith("num_batches_tracked")]  # BN step counters
    unexpected = [k for k in ours if k not in target and not k.endswith("num_batches_tracked")]
    shapes = [f"{k}: {tuple(v.shape)} vs model {tuple(target[k].shape)}"
              for k, v in ours.items() if k in target and v.shape != target[k].shape]
    if missing or unexpected or shapes:
        raise ConversionError(f"torchvision {variant} weights from {name} do not fit this model (use "
                              f"model={PRESETS[variant]} and the checkpoint's class count): shape mismatches "
                              f"{shapes[:5]}, missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(ours, strict=False)  # num_batches_tracked: dropped by FrozenBatchNorm2d
    return variant


# torchvision's evaluation settings (RetinaNet defaults, GeneralizedRCNNTransform), for COCO numbers like its own
TORCHVISION_POSTPROCESS = {"_target_": "retinanet.postprocess.PostProcessor", "score_thresh": 0.05,
                           "topk_candidates": 1000, "nms_thresh": 0.5, "detections_per_img": 300}
TORCHVISION_DATA = {"name": "coco", "min_size": 800, "max_size": 1333, "size_divisible": 32}


def torchvision_eval_config(variant: str) -> dict:
    """Checkpoint ``config`` that evaluates like torchvision: the ``model`` preset with its padded-size
    strides, 300 detections per image, resize 800 / 1333 and padding to 32."""
    from omegaconf import OmegaConf

    from retinanet.config import load_preset

    model = OmegaConf.to_container(load_preset("model", PRESETS[variant]), resolve=True)
    model["anchors"]["strides_from_image"] = True
    return {"model": model, "postprocess": dict(TORCHVISION_POSTPROCESS), "data": dict(TORCHVISION_DATA)}


def convert_to_checkpoint(source: str, out: str | os.PathLike, keep_all_classes: bool = False) -> dict:
    """Write a checkpoint of this project from torchvision weights (``retinanet-evaluate`` reads it); returns it.

    91-output COCO weights are cut to the 80 COCO categories (label order = sorted category id,
    as ``CocoDetection`` builds it) unless ``keep_all_classes``.
    """
    from hydra.utils import instantiate

    from retinanet.files import atomic_save

    state = load_torchvision_state_dict(source)
    variant = torchvision_variant(state)
    num_anchors = state["head.regression_head.bbox_reg.weight"].shape[0] // 4
    num_outputs = state["head.classification_head.cls_logits.weight"].shape[0] // num_anchors
    keep = None
    if num_outputs == 91 and not keep_all_classes:
        label_map = coco_label_map()
        keep = label_map["category_ids"]
    else:
        label_map = {"class_names": [f"class_{i}" for i in range(num_outputs)],
                     "category_ids": list(range(num_outputs))}
    config = torchvision_eval_config(variant)
    model = instantiate(config["model"]["net"], num_classes=len(label_map["category_ids"]), num_anchors=num_anchors)
    load_torchvision_weights(model, state, keep)  # proves the preset fits before anything is written
    ckpt = {"model": model.state_dict(), "config": config, "label_map": label_map, "source": str(source),
            "torchvision_variant": variant}
    atomic_save(ckpt, out)
    log.info("torchvision %s weights from %s -> %s (model=%s, %d classes)", variant, source, out, PRESETS[variant],
             len(label_map["category_ids"]))
    return ckpt


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m retinanet.torchvision_weights", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help=f"a torchvision .pth or a weights name, e.g. {TORCHVISION_WEIGHTS['v2']}")
    parser.add_argument("out", help="checkpoint to write, e.g. torchvision_v2_coco.pt")
    parser.add_argument("--keep-all-classes", action="store_true",
                        help="keep all 91 outputs (default: the 80 COCO categories, for COCO evaluation)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        convert_to_checkpoint(args.source, args.out, args.keep_all_classes)
    except UserError as err:  # a message naming the file / key, not a traceback
        log.error("%s", err)
        sys.exit(2)


if __name__ == "__main__":
    main()
