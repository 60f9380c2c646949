"""Feature pyramid network producing P3-P7 from C3-C5 (Lin et al. 2017, RetinaNet variant)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _init_conv(conv: nn.Conv2d) -> None:
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class FPN(nn.Module):
    """Top-down pathway with lateral 1x1 convs, 3x3 output convs and extra levels P6, P7.

    Args:
        in_channels: channels of C3, C4, C5.
        out_channels: channels of every P level (256 in the paper).
        p6_from: ``"c5"`` (the paper, torchvision v2) or ``"p5"`` (torchvision v1).
        extra_levels: how many stride-2 levels above P5 (2 gives P6, P7).
    A ReLU is applied to P6 before the conv that makes P7, as in the paper.
    """

    def __init__(self, in_channels: tuple[int, ...], out_channels: int = 256, p6_from: str = "c5",
                 extra_levels: int = 2):
        super().__init__()
        if p6_from not in ("c5", "p5"):
            raise ValueError(f"p6_from={p6_from!r} must be 'c5' or 'p5'")
        self.p6_from = p6_from
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        extra_in = [in_channels[-1] if p6_from == "c5" else out_channels] + [out_channels] * (extra_levels - 1)
        self.extra = nn.ModuleList(nn.Conv2d(c, out_channels, 3, stride=2, padding=1) for c in extra_in[:extra_levels])
        self.out_channels = out_channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                _init_conv(m)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral, feats)]
        top = laterals[-1]
        merged = [top]
        for lat in reversed(laterals[:-1]):
            top = lat + F.interpolate(top, size=lat.shape[-2:], mode="nearest")
            merged.insert(0, top)
        outs = [conv(m) for conv, m in zip(self.output, merged)]
        x = feats[-1] if self.p6_from == "c5" else outs[-1]
        for i, conv in enumerate(self.extra):
            x = strided_conv(conv, F.relu(x) if i > 0 else x)
            outs.append(x)
        return outs


def strided_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``, but in fp32 when bf16 autocast on the CPU meets a map with a side of 1 pixel.

    torch 2.14's CPU bf16 convolution returns a weight gradient with NaNs (memory it never wrote) for a
    stride-2 3x3 conv whose input has a side of 1 (measured on AVX512-BF16: about half of 30 trials,
    NCHW and NHWC alike; sides of 2 or more, and stride 1, are fine). P6 of an image padded to 32 px
    and P7 of one padded to 64 px are such maps. They are tiny, so fp32 costs nothing measurable.
    """
    # autocast first: in fp32 (and in an exported graph) the shape is never looked at, so no guard on it
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16 \
            and x.device.type == "cpu" and min(x.shape[-2:]) == 1:
        with torch.autocast("cpu", enabled=False):
            return conv(x.float())
    return conv(x)
