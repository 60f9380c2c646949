"""Batching: pad images to one uint8 tensor and ground truth to [B, M] arrays.

Images stay uint8 (normalisation happens in the model, on the device: 4x less to copy).
Padding is bottom/right with zeros, to H and W divisible by ``size_divisible``. Ground truth
is padded to M = max boxes in the batch (at least 1, so shapes never have a zero dimension
that downstream max/argmax would reject): padded rows have label -1, box 0, crowd False.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch


@dataclass
class Batch:
    """A collated batch; every field is a tensor with B rows."""

    images: torch.Tensor        # uint8 [B, 3, H, W], zero padded, H % size_divisible == W % size_divisible == 0
    gt_boxes: torch.Tensor      # float32 [B, M, 4] xyxy in resized-image pixels, zeros where padded
    gt_labels: torch.Tensor     # int64 [B, M], contiguous labels, -1 = padding
    gt_crowd: torch.Tensor      # bool [B, M]
    image_ids: torch.Tensor     # int64 [B]
    image_sizes: torch.Tensor   # int64 [B, 2] (h, w) after the transform, before padding
    orig_sizes: torch.Tensor    # int64 [B, 2] (h, w) of the image file
    scales: torch.Tensor        # float32 [B, 2] (sy, sx) = resized / original

    def _map(self, fn) -> "Batch":
        return Batch(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True) on custom batch types."""
        return self._map(lambda t: t.pin_memory())

    def __len__(self) -> int:
        return self.images.shape[0]


def _round_up(value: int, divisor: int) -> int:
    return -(-value // divisor) * divisor


class Collate:
    """``collate_fn`` for ``CocoDetection`` samples -> ``Batch``."""

    def __init__(self, size_divisible: int = 128):
        if int(size_divisible) < 1:
            raise ValueError(f"Collate: size_divisible={size_divisible} must be >= 1")
        self.size_divisible = int(size_divisible)

    def __call__(self, samples: list[dict]) -> Batch:
        b = len(samples)
        sizes = np.array([s["image"].shape[:2] for s in samples], dtype=np.int64).reshape(b, 2)
        height = _round_up(int(sizes[:, 0].max()), self.size_divisible)
        width = _round_up(int(sizes[:, 1].max()), self.size_divisible)
        images = torch.zeros((b, 3, height, width), dtype=torch.uint8)
        for i, s in enumerate(samples):
            h, w = sizes[i]
            image = torch.from_numpy(np.ascontiguousarray(s["image"]))
            images[i, :, :h, :w] = image.permute(2, 0, 1)  # [h, w, 3] -> [3, h, w]

        counts = [len(s["labels"]) for s in samples]
        m = max(1, max(counts))
        boxes = np.zeros((b, m, 4), dtype=np.float32)
        labels = np.full((b, m), -1, dtype=np.int64)
        crowd = np.zeros((b, m), dtype=bool)
        for i, (s, n) in enumerate(zip(samples, counts)):
            boxes[i, :n] = np.asarray(s["boxes"], dtype=np.float32).reshape(n, 4)
            labels[i, :n] = s["labels"]
            crowd[i, :n] = s["crowd"]
        return Batch(
            images=images,
            gt_boxes=torch.from_numpy(boxes),
            gt_labels=torch.from_numpy(labels),
            gt_crowd=torch.from_numpy(crowd),
            image_ids=torch.tensor([s["image_id"] for s in samples], dtype=torch.int64),
            image_sizes=torch.from_numpy(sizes),
            orig_sizes=torch.tensor([s["orig_size"] for s in samples], dtype=torch.int64).reshape(b, 2),
            scales=torch.tensor([s["scale"] for s in samples], dtype=torch.float32).reshape(b, 2),
        )
