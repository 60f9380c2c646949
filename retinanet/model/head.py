"""Classification and box subnets shared across pyramid levels."""

from __future__ import annotations

import math

import torch
from torch import nn

HEAD_NORMS = ("none", "gn")


class Subnet(nn.Module):
    """``depth`` x (3x3 conv [+ GroupNorm] + ReLU) followed by a 3x3 predictor conv.

    Output per level: ``[B, A * out_per_anchor, H, W]`` reshaped to ``[B, H*W*A, out_per_anchor]``.
    """

    def __init__(self, in_channels: int, num_anchors: int, out_per_anchor: int, width: int = 256,
                 depth: int = 4, norm: str = "none", gn_groups: int = 32, prior_bias: float = 0.0):
        super().__init__()
        if norm not in HEAD_NORMS:
            raise ValueError(f"head_norm={norm!r} is not one of {list(HEAD_NORMS)}")
        layers: list[nn.Module] = []
        for i in range(depth):
            conv = nn.Conv2d(in_channels if i == 0 else width, width, 3, padding=1, bias=norm == "none")
            nn.init.normal_(conv.weight, std=0.01)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
            layers.append(conv)
            if norm == "gn":
                layers.append(nn.GroupNorm(group_count(width, gn_groups), width))
            layers.append(nn.ReLU(inplace=True))
        self.tower = nn.Sequential(*layers)
        self.predictor = nn.Conv2d(width if depth else in_channels, num_anchors * out_per_anchor, 3, padding=1)
        nn.init.normal_(self.predictor.weight, std=0.01)
        nn.init.constant_(self.predictor.bias, prior_bias)
        self.num_anchors, self.out_per_anchor = num_anchors, out_per_anchor

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        outs = []
        for f in feats:
            y = self.predictor(self.tower(f))
            b, _, h, w = y.shape
            # [B, A*C, H, W] -> [B, H, W, A*C] (channel a*C + c) -> [B, H*W*A, C]. The clone is the copy reshape
            # would make; unlike reshape (or contiguous()) it decides nothing from the sizes, which a 1 x 1 map
            # (P7 of a small image) would fix in an exported graph; the view of its result is always possible
            y = y.permute(0, 2, 3, 1).clone(memory_format=torch.contiguous_format)
            outs.append(y.view(b, h * w * self.num_anchors, self.out_per_anchor))
        return torch.cat(outs, dim=1)  # level-major: [B, A_total, C]


def prior_logit(prior: float) -> float:
    """Bias that makes every anchor start at probability ``prior`` (paper: 0.01)."""
    if not 0.0 < prior < 1.0:
        raise ValueError(f"prior_prob={prior} must be in (0, 1)")
    return -math.log((1.0 - prior) / prior)


def group_count(channels: int, wanted: int = 32) -> int:
    """The largest group count <= ``wanted`` that divides ``channels`` with >= 2 channels a group.

    A group of one channel has a single value on a 1x1 map (P7 of a small image), which
    GroupNorm cannot normalise; 256 channels keep the usual 32 groups.
    """
    for groups in range(min(wanted, channels // 2), 0, -1):
        if channels % groups == 0:
            return groups
    return 1

