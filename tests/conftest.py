"""Shared fixtures: composed Hydra configs and a tiny generated dataset (built once per session)."""

import os
from pathlib import Path

import pytest

from retinanet import config

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = str(config.CONFIGS)  # the package's config tree (configs/ in the clone is a symlink to it)


def compose_train(overrides=()):
    """The training config as `retinanet-train` (scripts/train.py) would see it with these overrides."""
    return config.compose_config(overrides)


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory) -> Path:
    """A small embedded-style dataset (48 train / 16 val images)."""
    from retinanet.data.shapes import ensure_shapes_dataset

    root = tmp_path_factory.mktemp("shapes")
    ensure_shapes_dataset(root, num_train=48, num_val=16, seed=1, workers=1)
    return root


def tiny_train_overrides(root: Path, out_epochs: int = 2) -> list[str]:
    """Overrides for a fast CPU run on ``tiny_shapes``."""
    return [
        f"data.root={root}", "data.generate.num_train=48", "data.generate.num_val=16", "data.generate.seed=1",
        "data.min_size=128", "data.max_size=128", "data.eval_min_size=null", "data.eval_max_size=null",
        f"trainer.epochs={out_epochs}", "trainer.batch_size=8",
        "trainer.eval_batch_size=16", "trainer.num_workers=0", "trainer.progress=false", "trainer.log_every=1",
        "model.net.fpn_channels=32", "model.net.head_width=32", "model.net.head_depth=2",
        "schedule.warmup=0.2", "data.generate.workers=1",
    ]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A checkpoint of one short epoch (2 steps, 64-96 px) on a 16 train / 8 val shapes dataset:
    ``.checkpoint`` (its last.pt) and ``.root`` (the dataset)."""
    from types import SimpleNamespace

    from retinanet.data.shapes import ensure_shapes_dataset
    from retinanet.trainer import run

    root = tmp_path_factory.mktemp("micro_shapes")
    ensure_shapes_dataset(root, num_train=16, num_val=8, seed=2, workers=1)
    out = tmp_path_factory.mktemp("tiny_run")
    run(compose_train(tiny_train_overrides(root, out_epochs=1) + [
        "data.generate=null", "data.min_size=64", "data.max_size=96", "trainer.eval_batch_size=8"]), out)
    return SimpleNamespace(checkpoint=out / "last.pt", root=root)
