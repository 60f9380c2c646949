"""Datasets and loaders from the ``data`` config group (used by training, evaluation and tools)."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from retinanet.data.coco import CocoDetection
from retinanet.data.collate import Collate
from retinanet.data.transforms import build_transforms


def build_dataset(data_cfg: DictConfig, split: str, train: bool) -> CocoDetection:
    """The dataset of one split with its transform (augmented for training)."""
    aug = data_cfg.augment
    transform = build_transforms(
        train=train, min_size=data_cfg.min_size, max_size=data_cfg.max_size,
        hflip_prob=aug.hflip_prob, scale_range=tuple(aug.scale_range), translate=aug.translate,
        color_jitter=aug.color_jitter, min_visibility=aug.min_visibility,
    )
    return CocoDetection(data_cfg[f"{split}_ann"], data_cfg[f"{split}_images"], transform=transform)


def build_loader(dataset, batch_size: int, shuffle: bool, num_workers: int, size_divisible: int,
                 seed: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle and len(dataset) >= batch_size,
        num_workers=num_workers, collate_fn=Collate(size_divisible), generator=generator,
        pin_memory=pin_memory, persistent_workers=num_workers > 0,
    )
