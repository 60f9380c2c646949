"""RetinaNet: ResNet backbone + FPN (P3-P7) + class and box subnets. Returns raw outputs only.

Loss (``retinanet.losses``) and post-processing (``retinanet.postprocess``) are separate
objects, so validation loss costs nothing extra and inference carries no loss code.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from retinanet.model.backbone import ResNetBackbone
from retinanet.model.fpn import FPN
from retinanet.model.head import Subnet, prior_logit

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RetinaNetOutput(NamedTuple):
    cls_logits: torch.Tensor  # [B, A_total, K]
    box_deltas: torch.Tensor  # [B, A_total, 4]
    feature_shapes: list[tuple[int, int]]  # (h, w) of P3..P7


class RetinaNet(nn.Module):
    """ResNet-FPN RetinaNet.

    Images come in as uint8 ``[B, 3, H, W]`` (0-255) or float in [0, 1]; normalisation
    with the ImageNet mean/std happens inside, on the device.

    ``backbone_width`` (64: torchvision's ResNets) narrows the backbone: ``retinanet.model.backbone.NarrowResNet``.
    ``bn_eps`` (None keeps torch's 1e-5) sets the epsilon of every backbone batch norm:
    torchvision's v1 COCO weights expect 0.0 (what its ``overwrite_eps`` does when loading them).
    """

    def __init__(self, num_classes: int, num_anchors: int = 9, backbone: str = "resnet50",
                 weights: str | None = None, norm: str = "frozen_bn", frozen_stages: int = 2,
                 fpn_channels: int = 256, p6_from: str = "c5", head_width: int = 256, head_depth: int = 4,
                 head_norm: str = "none", prior_prob: float = 0.01, bn_eps: float | None = None,
                 backbone_width: int = 64):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be >= 1")
        for name, value, lo in (("fpn_channels", fpn_channels, 1), ("head_width", head_width, 1),
                                ("head_depth", head_depth, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name}={value!r} must be an integer >= {lo}")
        self.num_classes = num_classes
        self.prior_prob = float(prior_prob)
        self.backbone = ResNetBackbone(backbone, weights, norm, frozen_stages, width=backbone_width)
        if bn_eps is not None:
            if bn_eps < 0:
                raise ValueError(f"bn_eps={bn_eps} must be >= 0")
            for m in self.backbone.modules():
                if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)):
                    m.eps = float(bn_eps)
        self.fpn = FPN(self.backbone.out_channels, fpn_channels, p6_from)
        self.cls_head = Subnet(fpn_channels, num_anchors, num_classes, head_width, head_depth, head_norm,
                               prior_bias=prior_logit(prior_prob))
        self.box_head = Subnet(fpn_channels, num_anchors, 4, head_width, head_depth, head_norm)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255, persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() if images.dtype == torch.uint8 else images.float() * 255.0
        return (x - self.pixel_mean) / self.pixel_std

    def forward(self, images: torch.Tensor) -> RetinaNetOutput:
        feats = self.fpn(self.backbone(self.normalize(images)))
        shapes = [(f.shape[-2], f.shape[-1]) for f in feats]  # ints (symbolic sizes while exporting)
        return RetinaNetOutput(self.cls_head(feats), self.box_head(feats), shapes)
