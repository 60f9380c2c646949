"""Anchor boxes for every FPN level, in the order the heads emit their predictions.

Order of ``A_total = sum_l H_l * W_l * A`` anchors: level-major (P3 first), then row-major
locations (y outer, x inner), then the ``A = len(aspect_ratios) * len(scales)`` anchors of a
cell, ratio-major and scale-minor (anchor ``a = r * n_scales + s``). This is torchvision's
order, so its RetinaNet weights can be used directly.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor


def feature_shapes(image_hw: Sequence[int], strides: Sequence[float] = (8, 16, 32, 64, 128)) -> list[tuple[int, int]]:
    """(h, w) of the feature maps of a padded input ``image_hw`` at power-of-two ``strides`` (P3..P7).

    Every stride-2 stage of the network (stem conv, max-pool, the ResNet stages, the P6 / P7 convs; kernel
    3 or 7 with 'same' padding) maps ``n -> ceil(n / 2)``, and nested halvings round up together:
    ``ceil(n / s)``. ``tests/test_anchors.py`` checks this against the model's own output shapes.
    """
    h, w = int(image_hw[0]), int(image_hw[1])
    return [(math.ceil(h / s), math.ceil(w / s)) for s in strides]


class AnchorGenerator:
    """Anchors ``[A_total, 4]`` (xyxy pixels) for given feature-map shapes, cached per size.

    Cell anchor for size ``S``, scale ``s`` and aspect ratio ``r = h / w``: area ``(S*s)^2``,
    ``w = S*s / sqrt(r)``, ``h = S*s * sqrt(r)``, centred at ``((x + offset) * stride,
    (y + offset) * stride)`` for feature cell ``(y, x)``.

    Three torchvision details can be switched on to reproduce its anchors exactly:
    ``round_cell_anchors`` rounds the centred cell anchors to integers, ``strides_from_image``
    uses ``image_size // feature_size`` per axis as the stride instead of the nominal
    ``strides`` (61 / 114 instead of 64 / 128 for P6 / P7 of an 800-pixel side), and
    ``sizes_per_level`` gives the anchor sizes of every level explicitly instead of
    ``size * scale`` (torchvision truncates them to integers: ``(32, 40, 50), (64, 80, 101), ...``).
    With ``sizes_per_level`` set, ``sizes`` and ``scales`` are not used. ``scale`` multiplies every anchor size
    (of ``sizes`` or of ``sizes_per_level``): ``recipe=auto`` fits it to the boxes of a dataset.
    """

    def __init__(
        self,
        sizes: Sequence[float] = (32, 64, 128, 256, 512),
        strides: Sequence[float] = (8, 16, 32, 64, 128),
        scales: Sequence[float] = (1.0, 2 ** (1 / 3), 2 ** (2 / 3)),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        offset: float = 0.0,
        round_cell_anchors: bool = False,
        strides_from_image: bool = False,
        sizes_per_level: Sequence[Sequence[float]] | None = None,
        cache_size: int = 16,
        scale: float = 1.0,
    ):
        if not float(scale) > 0:
            raise ValueError(f"scale={scale!r} must be a positive number (the multiple of every anchor size)")
        scale = float(scale)
        levels = None
        if sizes_per_level is not None:
            levels = tuple(tuple(float(v) * scale for v in level) for level in sizes_per_level)
            if (not levels or len({len(level) for level in levels}) != 1 or not levels[0]
                    or any(v <= 0 for level in levels for v in level)):
                raise ValueError(f"sizes_per_level={[list(level) for level in levels]} must hold one "
                                 "non-empty list of positive sizes per level, all of the same length")
            sizes, scales = [level[0] for level in levels], [v / levels[0][0] for v in levels[0]]  # nominal only
        if len(sizes) != len(strides):
            raise ValueError(f"sizes {list(sizes)} and strides {list(strides)} need one value per level")
        for name, values in (("sizes", sizes), ("strides", strides), ("scales", scales),
                             ("aspect_ratios", aspect_ratios)):
            if len(values) == 0 or any(float(v) <= 0 for v in values):
                raise ValueError(f"{name} must be a non-empty list of positive numbers, got {list(values)}")
        self.sizes = tuple(float(s) * (scale if levels is None else 1.0) for s in sizes)
        self.strides = tuple(float(s) for s in strides)
        self.scales = tuple(float(s) for s in scales)
        self.aspect_ratios = tuple(float(r) for r in aspect_ratios)
        self.offset = float(offset)
        self.round_cell_anchors = bool(round_cell_anchors)
        self.strides_from_image = bool(strides_from_image)
        self.sizes_per_level = levels or tuple(tuple(size * s for s in self.scales) for size in self.sizes)
        self.num_anchors_per_location = len(self.sizes_per_level[0]) * len(self.aspect_ratios)
        self.cell_anchors = [self._cell_anchors(level) for level in self.sizes_per_level]  # per level [A, 4] float64
        self._cache: OrderedDict[tuple, Tensor] = OrderedDict()
        self._cache_size = int(cache_size)

    def _cell_anchors(self, level_sizes: Sequence[float]) -> Tensor:
        """Anchors of one cell centred at 0: ``[A, 4]`` in ratio-major, scale-minor order (float64)."""
        side = torch.tensor(level_sizes, dtype=torch.float64)  # [S]
        sqrt_r = torch.tensor(self.aspect_ratios, dtype=torch.float64).sqrt()  # [R]
        ws = (side[None, :] / sqrt_r[:, None]).reshape(-1)  # [R, S] -> [R*S]
        hs = (side[None, :] * sqrt_r[:, None]).reshape(-1)  # [R, S] -> [R*S]
        cell = torch.stack([-ws, -hs, ws, hs], dim=1) / 2
        return cell.round() if self.round_cell_anchors else cell

    def num_anchors_per_level(self, feature_shapes: Sequence[Sequence[int]]) -> list[int]:
        """``[H_l * W_l * A for each level]``: how to split ``[B, A_total, ...]`` per level."""
        return [h * w * self.num_anchors_per_location for h, w in feature_shapes]  # ints, or symbolic sizes in export

    def for_image(self, image_hw: Sequence[int], device: torch.device | str | None = None) -> Tensor:
        """Anchors ``[A_total, 4]`` of a padded input of size ``image_hw``, before any forward pass."""
        return self(feature_shapes(image_hw, self.strides), image_hw, device)

    def __call__(
        self,
        feature_shapes: Sequence[Sequence[int]],
        image_hw: Sequence[int],
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Anchors ``[A_total, 4]`` for feature maps of ``feature_shapes`` on an image of ``image_hw``.

        The result is cached (a few sizes, least recently used dropped first) and shared:
        do not modify it in place.
        """
        shapes = tuple((int(h), int(w)) for h, w in feature_shapes)
        key = (shapes, (int(image_hw[0]), int(image_hw[1])), torch.device(device or "cpu"), dtype)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        anchors = self.grid(shapes, key[1], key[2], dtype)
        self._cache[key] = anchors
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return anchors

    def grid(self, feature_shapes: Sequence[Sequence[int]], image_hw: Sequence[int],
             device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """``__call__`` without the cache: tensor ops on the sizes only, so an exported graph (``retinanet.deploy.export``)
        computes the anchors of whatever input size it is given (sizes may be symbolic there)."""
        if len(feature_shapes) != len(self.cell_anchors):
            raise ValueError(f"anchors: got {len(feature_shapes)} feature maps {list(feature_shapes)} but anchors are "
                             f"configured for {len(self.cell_anchors)} levels (sizes {list(self.sizes)})")
        levels = [self._grid(cell, shape, stride, image_hw)
                  for cell, shape, stride in zip(self.cell_anchors, feature_shapes, self.strides)]
        return torch.cat(levels).to(device=device, dtype=dtype)

    def _grid(self, cell: Tensor, shape: tuple[int, int], stride: float, image_hw: tuple[int, int]) -> Tensor:
        """Cell anchors ``[A, 4]`` shifted to every location of an ``(h, w)`` map -> ``[h*w*A, 4]``."""
        h, w = shape
        stride_y, stride_x = (image_hw[0] // h, image_hw[1] // w) if self.strides_from_image else (stride, stride)
        ys = (torch.arange(h, dtype=torch.float64) + self.offset) * stride_y  # [h]
        xs = (torch.arange(w, dtype=torch.float64) + self.offset) * stride_x  # [w]
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")  # [h, w] each
        centres = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)  # [h, w, 4] -> [h*w, 1, 4]
        return (centres + cell[None]).reshape(-1, 4)  # [h*w, A, 4] -> [h*w*A, 4]
