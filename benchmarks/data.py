"""Case "data": images/s of the training DataLoader (augmentation, default worker count) on the shapes data.

Uses ``configs/data/shapes.yaml`` and ``configs/trainer/default.yaml`` as the trainer does
(``build_dataset`` + ``build_loader``), with every augmentation on (``FULL_AUGMENT``: the preset
keeps only the flip; the bench measures the heavier pipeline a long run uses). The dataset is
``data/shapes`` when it exists, else a small one generated under the bench output folder. The first
batch (worker start-up) is not timed.
"""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import OmegaConf

from retinanet.config import load_preset

REPO = Path(__file__).resolve().parents[1]  # the clone


def shapes_root(fallback: Path) -> Path:
    """``data/shapes`` if it is generated, else a small shapes set under ``fallback`` (made once)."""
    default = REPO / "data" / "shapes"
    if (default / "manifest.json").exists():
        return default
    from retinanet.data.shapes import ensure_shapes_dataset

    ensure_shapes_dataset(fallback, num_train=160, num_val=64, seed=0, workers=1)
    return fallback


FULL_AUGMENT = {"hflip_prob": 0.5, "scale_range": [0.8, 1.2], "translate": 0.1, "color_jitter": 0.2}


def data_config(root: Path):
    cfg = load_preset("data", "shapes")
    cfg.root = str(root)
    cfg.augment = OmegaConf.merge(cfg.augment, FULL_AUGMENT)
    return cfg


def loader_images_per_s(root: Path, batches: int = 10, batch_size: int | None = None,
                        num_workers: int | None = None) -> dict:
    from retinanet.data.build import build_dataset, build_loader

    trainer = load_preset("trainer", "default")
    batch_size = int(batch_size or trainer.batch_size)
    num_workers = int(trainer.num_workers if num_workers is None else num_workers)
    cfg = data_config(root)
    dataset = build_dataset(cfg, "train", train=True)
    loader = build_loader(dataset, batch_size, True, num_workers, cfg.size_divisible, 0, False)
    it = iter(loader)
    next(it)  # worker start-up
    images, t0 = 0, time.perf_counter()
    for _ in range(batches):
        images += len(next(it))
    seconds = time.perf_counter() - t0
    del it
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds, "batch_size": batch_size,
            "num_workers": num_workers}
