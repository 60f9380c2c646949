"""Bbox-aware augmentation (albumentations) followed by the detector's resize.

``DetectionTransform(t)(image, boxes, labels, crowd) -> (image, boxes, labels, crowd)`` with
boxes xyxy float32 pixels. After every call the boxes are inside the image and at least
``min_box_size`` pixels wide and high (boxes cut away by a crop are dropped with their labels).

The final resize scales by ``s = min(min_size / shorter side, max_size / longer side)`` (the
detectron / torchvision rule; with ``min_size=None`` the longer side becomes ``max_size``, like
``A.LongestMaxSize``). Small images are enlarged too. It is done here rather than in the
albumentations pipeline because albumentations has no transform for the min/max rule; boxes
are multiplied by the exact per-axis ratio of output to input size.

Multi-scale training: ``min_size`` may be a list; each training image then draws its shorter
side from it (the evaluation transform uses the largest).
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def resized_shape(height: int, width: int, min_size: int | None, max_size: int | None) -> tuple[int, int]:
    """Output (h, w) of the final resize (unchanged when both sizes are None)."""
    scales = []
    if min_size is not None:
        scales.append(min_size / min(height, width))
    if max_size is not None:
        scales.append(max_size / max(height, width))
    if not scales:
        return height, width
    s = min(scales)
    return max(1, int(round(height * s))), max(1, int(round(width * s)))


class DetectionTransform:
    """An ``A.Compose`` over image + pascal_voc boxes + (labels, crowd), then the min/max resize.

    Picklable (DataLoader workers). Random state: albumentations draws from its own generator,
    which is reseeded from ``torch.initial_seed()`` the first time the transform runs in a new
    process or DataLoader worker, so workers differ and runs with a seeded loader repeat.
    ``reseed(seed)`` sets it explicitly (per-sample seeding for exact resume, see
    ``retinanet.data.samplers``). A list ``min_size`` draws the shorter side from that state too.
    """

    def __init__(self, transforms: list, min_size: int | Sequence[int] | None = None, max_size: int | None = None,
                 min_visibility: float = 0.0, min_box_size: float = 1.0):
        self.transforms = list(transforms)
        self.min_size, self.max_size = min_size, max_size
        self._size_rng = random.Random(0)
        self.min_box_size = float(min_box_size)
        self.compose = None if not self.transforms else A.Compose(self.transforms, bbox_params=A.BboxParams(
            format="pascal_voc", label_fields=["labels", "crowd"], min_visibility=min_visibility, clip=True,
            filter_invalid_bboxes=True))
        self._rng_owner = None

    @staticmethod
    def _owner() -> tuple:
        info = torch.utils.data.get_worker_info()
        return os.getpid(), None if info is None else info.id

    def _reseed_for_this_process(self) -> None:
        if self._owner() != self._rng_owner:
            self.reseed(torch.initial_seed() % 2**32)  # DataLoader: base_seed + worker id

    def reseed(self, seed: int) -> None:
        """Set the random state of every augmentation (and of the multi-scale choice) from ``seed``."""
        seed = int(seed) % 2**32
        if self.compose is not None:
            self.compose.set_random_seed(seed)
        self._size_rng = random.Random(seed)
        self._rng_owner = self._owner()

    def __call__(self, image: np.ndarray, boxes, labels, crowd):
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        crowd = np.asarray(crowd, dtype=bool).reshape(-1)
        h, w = image.shape[:2]
        boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, labels, crowd = boxes[keep], labels[keep], crowd[keep]
        if self.compose is not None or self._multiscale:
            self._reseed_for_this_process()
        if self.compose is not None:
            out = self.compose(image=image, bboxes=boxes, labels=labels, crowd=crowd.astype(np.int64))
            image = out["image"]
            boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
            labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
            crowd = np.asarray(out["crowd"]).reshape(-1).astype(bool)
        image, boxes = self._resize(image, boxes)
        h, w = image.shape[:2]
        boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
        keep = ((boxes[:, 2] - boxes[:, 0]) >= self.min_box_size) & ((boxes[:, 3] - boxes[:, 1]) >= self.min_box_size)
        return np.ascontiguousarray(image), boxes[keep], labels[keep], crowd[keep]

    @property
    def _multiscale(self) -> bool:
        return isinstance(self.min_size, Sequence)

    def _resize(self, image: np.ndarray, boxes: np.ndarray):
        h, w = image.shape[:2]
        min_size = self._size_rng.choice(self.min_size) if self._multiscale else self.min_size
        out_h, out_w = resized_shape(h, w, min_size, self.max_size)
        if (out_h, out_w) == (h, w):
            return image, boxes
        shrink = out_h * out_w < h * w
        image = cv2.resize(image, (out_w, out_h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        ratio = np.array([out_w / w, out_h / h, out_w / w, out_h / h], dtype=np.float32)
        return image, boxes * ratio

    def __repr__(self) -> str:
        steps = ", ".join(type(t).__name__ for t in self.transforms) or "none"
        return f"DetectionTransform(augment=[{steps}], min_size={self.min_size}, max_size={self.max_size})"


def build_transforms(train: bool, size: int | None = None, hflip_prob: float = 0.5, scale_range=(0.8, 1.2),
                     translate: float = 0.1, color_jitter: float = 0.2, min_visibility: float = 0.3, *,
                     min_size: int | Sequence[int] | None = None, max_size: int | None = None) -> DetectionTransform:
    """The train (augmenting) or eval (resize only) transform.

    Give ``size`` (longer side becomes ``size``) or ``min_size``/``max_size`` (shorter side becomes
    ``min_size`` unless the longer side would exceed ``max_size``). Train: random zoom in
    ``scale_range`` (same for x and y) and shift up to ``translate`` of the image size
    (``A.Affine``, same canvas size, zero fill), horizontal flip, colour jitter, then the resize.
    Augmentations at their neutral value are left out. A list ``min_size`` (multi-scale training):
    each training image draws one of its values; evaluation uses the largest.
    """
    if size is not None:
        if min_size is not None or max_size is not None:
            raise ValueError("build_transforms: give either size or min_size/max_size, not both")
        max_size = size
    if max_size is None and min_size is None:
        raise ValueError("build_transforms: give size or min_size/max_size")
    if isinstance(min_size, Sequence) and not isinstance(min_size, str):
        if not min_size:
            raise ValueError("build_transforms: min_size=[] needs at least one size")
        min_size = tuple(int(v) for v in min_size)
        min_size = min_size if train and len(set(min_size)) > 1 else max(min_size)
    for name, value in (("min_size", min_size), ("max_size", max_size)):
        for v in (value if isinstance(value, tuple) else [value]):
            if v is not None and int(v) < 1:
                raise ValueError(f"build_transforms: {name}={value} must be a positive number of pixels")
    lo, hi = (float(v) for v in scale_range)
    if not 0 < lo <= hi or not 0 <= translate < 1 or not 0 <= hflip_prob <= 1 or not 0 <= color_jitter < 1:
        raise ValueError(f"build_transforms: scale_range={scale_range} needs 0 < min <= max, translate={translate} "
                         f"and color_jitter={color_jitter} in [0, 1), hflip_prob={hflip_prob} in [0, 1]")
    steps = []
    if train:
        if (lo, hi) != (1.0, 1.0) or translate > 0:
            steps.append(A.Affine(scale=(lo, hi), keep_ratio=True, translate_percent=(-translate, translate),
                                  rotate=0.0, border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0))
        if hflip_prob > 0:
            steps.append(A.HorizontalFlip(p=hflip_prob))
        if color_jitter > 0:
            c = color_jitter
            steps.append(A.ColorJitter(brightness=(1 - c, 1 + c), contrast=(1 - c, 1 + c),
                                       saturation=(1 - c, 1 + c), hue=(-c / 4, c / 4), p=0.8))
    if min_size is not None and not isinstance(min_size, tuple):
        min_size = int(min_size)
    return DetectionTransform(steps, min_size=min_size,
                              max_size=None if max_size is None else int(max_size),
                              min_visibility=min_visibility if train else 0.0)
