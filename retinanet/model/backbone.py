"""ResNet backbones returning C3, C4, C5 (strides 8, 16, 32).

Built from torchvision's ResNet constructors. ``weights`` may be None (random
init), the name of a torchvision weights enum member (``"ResNet50_Weights.IMAGENET1K_V1"``,
loaded through torchvision's own download/cache machinery), or a path to a local
``.pth`` file holding a ResNet state dict (``fc.*`` keys are ignored).
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn
from torchvision import models
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops.misc import FrozenBatchNorm2d

from retinanet.checkpoint import CheckpointError, read_state_dict

log = logging.getLogger(__name__)

RESNETS = {  # name: (torchvision constructor, block, blocks per stage)
    "resnet18": (models.resnet18, BasicBlock, (2, 2, 2, 2)),
    "resnet34": (models.resnet34, BasicBlock, (3, 4, 6, 3)),
    "resnet50": (models.resnet50, Bottleneck, (3, 4, 6, 3)),
    "resnet101": (models.resnet101, Bottleneck, (3, 4, 23, 3)),
}
WIDTH = 64  # channels of the stem and of layer1's blocks in every torchvision ResNet (layer2-4: 2x, 4x, 8x)
NORMS = ("frozen_bn", "bn", "gn")
STAGES = ("conv1", "layer1", "layer2", "layer3", "layer4")  # stem counts as stage 1


def _norm_layer(norm: str, gn_groups: int = 32):
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "gn":
        return lambda channels: nn.GroupNorm(min(gn_groups, channels), channels)
    raise ValueError(f"norm={norm!r} is not one of {list(NORMS)}")


class NarrowResNet(models.ResNet):
    """torchvision's ResNet with ``width`` channels in the stem and layer1 instead of 64 (layer2-4: 2x, 4x, 8x).

    The same blocks, strides and module names; its FLOPs scale with (width / 64)^2. Initialised as torchvision
    initialises its ResNets (Kaiming normal convolutions, unit norms, optionally zero residual branches).
    """

    def __init__(self, block, layers, width: int, norm_layer, zero_init_residual: bool = False):
        super().__init__(block, list(layers), norm_layer=norm_layer)
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(width)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)
        self.fc = nn.Identity()  # the backbone never classifies
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                last = m.bn3 if isinstance(m, Bottleneck) else m.bn2 if isinstance(m, BasicBlock) else None
                if last is not None and last.weight is not None:
                    nn.init.zeros_(last.weight)


def load_backbone_weights(weights: str) -> dict[str, torch.Tensor]:
    """Return a ResNet state dict from a local file or a torchvision enum name."""
    if os.path.exists(weights):
        try:
            return read_state_dict(weights)
        except CheckpointError as err:  # a ValueError: the config names the key (model.net: ...)
            raise ValueError(f"backbone weights={weights!r}: {err}") from None
    if "." in weights and "_Weights" in weights:
        try:
            enum = models.get_weight(weights)
        except (ValueError, KeyError, AttributeError) as err:
            raise ValueError(f"weights={weights!r}: unknown torchvision weights enum") from err
        return enum.get_state_dict(progress=True)
    raise FileNotFoundError(
        f"weights={weights!r}: no such file, and not a torchvision weights name "
        "like 'ResNet50_Weights.IMAGENET1K_V1'"
    )


class ResNetBackbone(nn.Module):
    """ResNet trunk that returns ``[C3, C4, C5]``.

    Args:
        depth: one of resnet18 / resnet34 / resnet50 / resnet101.
        weights: None, torchvision weights enum name, or local path.
        norm: ``frozen_bn`` (statistics and affine fixed), ``bn`` or ``gn``.
        frozen_stages: number of leading stages (stem, layer1, ...) with
            ``requires_grad=False``; 0 trains everything, 5 freezes everything.
        width: channels of the stem and layer1 (64: torchvision's ResNets, which pretrained weights fit;
            32 has a quarter of the FLOPs, for small CPU models trained from scratch).
    """

    def __init__(self, depth: str = "resnet50", weights: str | None = None, norm: str = "frozen_bn",
                 frozen_stages: int = 2, gn_groups: int = 32, width: int = WIDTH):
        super().__init__()
        if depth not in RESNETS:
            raise ValueError(f"backbone={depth!r} is not one of {sorted(RESNETS)}")
        if isinstance(frozen_stages, bool) or not isinstance(frozen_stages, int) or not 0 <= frozen_stages <= 5:
            raise ValueError(f"frozen_stages={frozen_stages!r} must be an integer within 0..5")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"backbone_width={width!r} must be an integer >= 1")
        if weights and width != WIDTH:
            raise ValueError(f"weights={weights!r} fit a backbone of width {WIDTH}, not backbone_width={width}")
        ctor, block, layers = RESNETS[depth]
        self.out_channels = tuple(width * 2**i * block.expansion for i in (1, 2, 3))  # C3, C4, C5
        # from scratch, start each residual block as identity (zero-init last BN scale): faster early training
        norm_layer, zero_init = _norm_layer(norm, gn_groups), not weights and norm != "frozen_bn"
        net = ctor(weights=None, norm_layer=norm_layer, zero_init_residual=zero_init) if width == WIDTH \
            else NarrowResNet(block, layers, width, norm_layer, zero_init)
        if weights:
            state = {k: v for k, v in load_backbone_weights(weights).items() if not k.startswith("fc.")}
            try:
                missing, unexpected = net.load_state_dict(state, strict=False)
            except RuntimeError as err:  # shape mismatches
                raise ValueError(f"backbone weights {weights!r} do not fit {depth}: {str(err)[:300]}") from None
            missing = [k for k in missing if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
            if missing or unexpected:
                raise ValueError(
                    f"backbone weights {weights!r} do not fit {depth}: missing {missing[:5]}, unexpected {unexpected[:5]}"
                )
            log.info("backbone %s initialised from %s", depth, weights)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        for name in STAGES[:frozen_stages]:
            modules = [self.conv1, self.bn1] if name == "conv1" else [getattr(self, name)]
            for module in modules:
                for p in module.parameters():
                    p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c3, c4, c5]

