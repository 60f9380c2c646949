"""Benchmark inputs: COCO-like anchors, ground truth and head outputs, the same for both sides."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from retinanet.anchors import AnchorGenerator

STRIDES = (8, 16, 32, 64, 128)


def torchvision_anchors() -> AnchorGenerator:
    """Anchors exactly as torchvision's RetinaNet makes them (sizes truncated, rounded, offset 0)."""
    sizes = [[int(s * 2 ** (i / 3)) for i in range(3)] for s in (32, 64, 128, 256, 512)]
    return AnchorGenerator(sizes_per_level=sizes, strides=STRIDES, aspect_ratios=(0.5, 1.0, 2.0), offset=0.0,
                           round_cell_anchors=True, strides_from_image=True)


def feature_shapes(height: int, width: int) -> list[tuple[int, int]]:
    """P3-P7 sizes of a ResNet-FPN for an input of ``height x width`` (stride-2 convs round up)."""
    shapes = []
    h, w = math.ceil(height / 8), math.ceil(width / 8)  # each stride-2 conv / pool rounds up
    for _ in STRIDES:
        shapes.append((h, w))
        h, w = (h + 1) // 2, (w + 1) // 2
    return shapes


def random_boxes(gen: torch.Generator, count: int, height: int, width: int) -> Tensor:
    """``count`` disjoint boxes ``[count, 4]``, one per cell of a grid over the image, in random cells.

    Each box spans 25-90% of its cell per side (random aspect), so gt never compete for an anchor and
    torchvision's matcher and ours agree exactly (they differ only where gt boxes overlap heavily).
    """
    cols = max(1, math.ceil(math.sqrt(count * width / height)))
    rows = max(1, math.ceil(count / cols))
    cell = torch.tensor([width / cols, height / rows])
    index = torch.randperm(rows * cols, generator=gen)[:count]
    corner = torch.stack([index % cols, index // cols], dim=1) * cell  # [count, 2] (x, y)
    wh = (0.25 + 0.65 * torch.rand(count, 2, generator=gen)) * cell
    xy = corner + torch.rand(count, 2, generator=gen) * (cell - wh)
    return torch.cat([xy, xy + wh], dim=1)


@dataclass
class Scene:
    """Head outputs and ground truth for a batch; image ``i`` has ``gt_labels[i] >= 0`` boxes."""

    anchors: Tensor            # [A, 4]
    per_level: list[int]       # anchors per level
    cls_logits: Tensor         # [B, A, K]
    box_deltas: Tensor         # [B, A, 4]
    gt_boxes: Tensor           # [B, M, 4]
    gt_labels: Tensor          # [B, M], -1 = padding
    image_hw: tuple[int, int]

    def to(self, device) -> "Scene":
        """The same scene with its tensors on ``device``."""
        return Scene(self.anchors.to(device), self.per_level, self.cls_logits.to(device), self.box_deltas.to(device),
                     self.gt_boxes.to(device), self.gt_labels.to(device), self.image_hw)

    def targets(self) -> list[dict]:
        """Ground truth in torchvision's form: one dict of boxes / labels per image."""
        keep = self.gt_labels >= 0
        return [{"boxes": b[k], "labels": lab[k]} for b, lab, k in zip(self.gt_boxes, self.gt_labels, keep)]


def make_scene(height: int = 800, width: int = 1216, num_classes: int = 80, boxes_per_image: int = 50,
               images_with_boxes: int = 2, empty_images: int = 1, logit_mean: float = -2.0, seed: int = 0) -> Scene:
    """A COCO-scale batch: ``images_with_boxes`` images with ``boxes_per_image`` gt, then empty ones.

    Logits ``N(logit_mean, 1)`` look like an untrained head: with the default -2 about 80% of the
    (anchor, class) scores are above 0.05, so post-processing sees many candidates.
    """
    gen = torch.Generator().manual_seed(seed)
    anchor_gen = torchvision_anchors()
    shapes = feature_shapes(height, width)
    anchors = anchor_gen(shapes, (height, width))
    batch = images_with_boxes + empty_images
    gt_boxes = torch.zeros(batch, max(1, boxes_per_image), 4)
    gt_labels = torch.full((batch, max(1, boxes_per_image)), -1, dtype=torch.int64)
    for i in range(images_with_boxes):
        boxes = random_boxes(gen, boxes_per_image, height, width)
        gt_boxes[i, :len(boxes)] = boxes
        gt_labels[i, :len(boxes)] = torch.randint(0, num_classes, (len(boxes),), generator=gen)
    cls_logits = torch.randn(batch, len(anchors), num_classes, generator=gen) + logit_mean
    box_deltas = torch.randn(batch, len(anchors), 4, generator=gen) * 0.2
    return Scene(anchors, anchor_gen.num_anchors_per_level(shapes), cls_logits, box_deltas, gt_boxes, gt_labels,
                 (height, width))
