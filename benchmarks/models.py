"""Our model from a preset and torchvision's of the same architecture, holding the same weights."""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from benchmarks.scene import random_boxes
from benchmarks.tv import same_architecture, torchvision_retinanet
from retinanet.config import load_preset
from retinanet.data.collate import Batch
from retinanet.torchvision_weights import convert_torchvision_state_dict


def preset(name: str, head_depth: int | None = 4) -> DictConfig:
    """``configs/model/<name>.yaml`` (with its anchors) with random initialisation (``weights: null``: nothing downloaded).

    ``head_depth``: conv layers per subnet on both sides, 4 (torchvision's ``RetinaNetHead``; the CPU preset
    trains with two) or None for the preset's own (torchvision's head cut to as many).
    """
    cfg = load_preset("model", name)
    cfg.net.weights = None
    if head_depth is not None:
        cfg.net.head_depth = head_depth
    return cfg


def config(group: str, name: str) -> DictConfig:
    return load_preset(group, name)


def build_pair(name: str, num_classes: int, image_hw: tuple[int, int], seed: int = 0, head_depth: int | None = 4):
    """``(ours, torchvision, anchors, architecture check)``; ours gets torchvision's weights (``head_depth``:
    ``preset``)."""
    cfg = preset(name, head_depth)
    torch.manual_seed(seed)
    anchors = instantiate(cfg.anchors)
    ours = instantiate(cfg.net, num_classes=num_classes, num_anchors=anchors.num_anchors_per_location)
    theirs = torchvision_retinanet(OmegaConf.to_container(cfg.net), num_classes, image_hw)
    ours.load_state_dict(convert_torchvision_state_dict(theirs.state_dict(), strict=True), strict=False)
    return ours, theirs, anchors, same_architecture(ours, theirs)


def make_batch(batch: int, height: int, width: int, num_classes: int, boxes_per_image: int, seed: int = 0) -> Batch:
    """Random uint8 images with ``boxes_per_image`` disjoint gt boxes each, collated like our loader does."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=gen)
    boxes = torch.stack([random_boxes(gen, boxes_per_image, height, width) for _ in range(batch)])
    labels = torch.randint(0, num_classes, (batch, boxes_per_image), generator=gen)
    sizes = torch.tensor([[height, width]] * batch)
    return Batch(images=images, gt_boxes=boxes, gt_labels=labels,
                 gt_crowd=torch.zeros(batch, boxes_per_image, dtype=torch.bool),
                 image_ids=torch.arange(batch), image_sizes=sizes, orig_sizes=sizes.clone(),
                 scales=torch.ones(batch, 2))


def targets_of(batch: Batch) -> list[dict]:
    """torchvision's training targets for a batch."""
    return [{"boxes": b[lab >= 0], "labels": lab[lab >= 0]} for b, lab in zip(batch.gt_boxes, batch.gt_labels)]
