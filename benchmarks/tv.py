"""torchvision's RetinaNet with the architecture of one of our model presets, for side-by-side runs.

Built from the parts ``torchvision.models.detection.retinanet_resnet50_fpn`` uses (ResNet trunk,
``_resnet_fpn_extractor`` / ``BackboneWithFPN``, ``LastLevelP6P7``, ``RetinaNet``), set as our
preset says: norm layer (frozen BN is what torchvision uses with pretrained weights), trainable
stages, FPN width, P6 from C5 or P5, head without norm (v1) or with GroupNorm (v2), and the preset's subnet
depth (torchvision's four convs cut to the first ``head_depth``). A narrower backbone (``backbone_width``) is
torchvision's ResNet class with those widths (``retinanet.model.backbone.NarrowResNet``). Its transform is
set to the benchmark size, so it only normalises and batches (its resize runs at scale 1).
``same_architecture`` checks parameter counts.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torchvision import models
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from retinanet.model.backbone import RESNETS, WIDTH, NarrowResNet

STAGES = ["conv1", "layer1", "layer2", "layer3", "layer4"]  # torchvision counts trainable layers from the top


def torchvision_retinanet(net: dict, num_classes: int, image_hw: tuple[int, int],
                          detections_per_img: int = 100) -> RetinaNet:
    """torchvision ``RetinaNet`` matching our ``model.net`` config ``net`` (a plain dict)."""
    depth, head_depth, width = net.get("backbone", "resnet50"), net.get("head_depth", 4), net.get("backbone_width", WIDTH)
    if not 0 < head_depth <= 4 or net.get("head_norm", "none") not in ("none", "gn"):
        raise ValueError("torchvision's RetinaNetHead has 4 convs (here cut to 1-4), without norm (v1) or with "
                         "GroupNorm(32) (v2)")
    if net.get("head_width", 256) != net.get("fpn_channels", 256):
        raise ValueError("torchvision's heads are as wide as the FPN")
    norm = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d}[net.get("norm", "frozen_bn")]
    _, block, layers = RESNETS[depth]
    trunk = getattr(models, depth)(weights=None, norm_layer=norm) if width == WIDTH \
        else NarrowResNet(block, layers, width, norm)
    trainable = STAGES[net.get("frozen_stages", 0):] + (["bn1"] if net.get("frozen_stages", 0) == 0 else [])
    for name, p in trunk.named_parameters():
        if not any(name.startswith(stage) for stage in trainable):
            p.requires_grad_(False)
    channels = [width * 2**i * block.expansion for i in (1, 2, 3)]  # C3, C4, C5
    fpn = net.get("fpn_channels", 256)
    p6_in = channels[-1] if net.get("p6_from", "c5") == "c5" else fpn  # LastLevelP6P7 uses P5 iff in == out
    backbone = BackboneWithFPN(trunk, {"layer2": "0", "layer3": "1", "layer4": "2"}, channels, fpn,
                               extra_blocks=LastLevelP6P7(p6_in, fpn))
    gn = partial(nn.GroupNorm, 32) if net.get("head_norm", "none") == "gn" else None
    head = RetinaNetHead(fpn, 9, num_classes, norm_layer=gn)
    for sub in (head.classification_head, head.regression_head):
        sub.conv = sub.conv[:head_depth]  # [conv (+ GroupNorm) + ReLU] x head_depth, as our Subnet
    return RetinaNet(backbone, num_classes, min_size=min(image_hw), max_size=max(image_hw), head=head,
                     detections_per_img=detections_per_img)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def same_architecture(ours: nn.Module, theirs: nn.Module) -> dict:
    """Parameter counts of both models; equal counts (total and trainable) for the same layers."""
    a, b = parameter_counts(ours), parameter_counts(theirs)
    return {"params_ours": a[0], "params_torchvision": b[0], "trainable_ours": a[1], "trainable_torchvision": b[1],
            "same": a == b}


def to_float_list(images: torch.Tensor) -> list[torch.Tensor]:
    """uint8 ``[B, 3, H, W]`` -> torchvision's input: a list of float ``[3, H, W]`` in [0, 1]."""
    return [im.float().div_(255) for im in images]
