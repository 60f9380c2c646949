"""Shared fixtures and helpers: composed Hydra configs, the scripts as modules, tiny generated datasets (built once
per session) and the overrides of tiny runs. Tests import the helpers from here (``from conftest import ...``), never
from each other."""

import importlib.util
import os
import socket
from pathlib import Path

import pytest

from retinanet import config

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = str(config.CONFIGS)  # the package's config tree (configs/ in the clone is a symlink to it)


def compose_train(overrides=()):
    """The training config as `retinanet-train` (scripts/train.py) would see it with these overrides."""
    return config.compose_config(overrides)


def load_script(name: str):
    """``scripts/<name>.py`` of the clone as a module (its ``run(cfg, out_dir)`` is the command's job)."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compose_cfg(name: str, overrides):
    """The config ``name`` (train, evaluate, infer, ...) composed with ``overrides``, as its command sees it."""
    return config.compose_config(overrides, name)


def eval_overrides(ckpt, root, *extra):
    """Overrides of evaluate / infer on checkpoint ``ckpt`` and the shapes data under ``root`` (no generation)."""
    return [f"checkpoint={ckpt}", f"data.root={root}", "data.generate=null", "progress=false", *extra]


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


TIMEOUT = 300  # seconds for one training subprocess on a busy 2-core machine (they take ~15 s alone)


def make_micro_shapes(root: Path) -> Path:
    """16 train / 5 val images of 64-96 px: 4 steps of 4 images per epoch."""
    from retinanet.data.shapes import ensure_shapes_dataset

    ensure_shapes_dataset(root, num_train=16, num_val=5, seed=1, workers=1, image_size=(64, 96),
                          object_size=(12, 40))
    return root


def micro_overrides(root: Path, epochs: int = 2) -> list[str]:
    """A tiny, single-threaded CPU run on ``make_micro_shapes`` data (one thread: no oversubscription)."""
    return [
        f"data.root={root}", "data.generate=null", "data.min_size=64", "data.max_size=64",
        "data.eval_min_size=null", "data.eval_max_size=null",
        f"trainer.epochs={epochs}", "trainer.batch_size=4", "trainer.eval_batch_size=8", "trainer.num_workers=0",
        "trainer.progress=false", "trainer.log_every=1", "trainer.threads=1", "model.net.fpn_channels=16",
        "model.net.head_width=16", "model.net.head_depth=1", "schedule.warmup=0.2",
        # every augmentation on (the shapes preset keeps only the flip): resumes must replay all of them
        "data.augment.scale_range=[0.8,1.2]", "data.augment.translate=0.1", "data.augment.color_jitter=0.2",
    ]


# Batch invariance (docs/export_and_inference.md, "Batches"): how far two runs' scores may differ, on the logit, as a
# fraction of max(1, |logit|): float rounding in fp32; two bf16 steps (2^-7 each) in bf16.
LOGIT_RTOL = {None: 1e-4, "bfloat16": 2**-6, "float16": 2**-9}


def unmatched_detections(a: dict, b: dict, dtype=None, limit: int = 100, iou: float = 0.5) -> list[str]:
    """The detections of ``a`` and ``b`` (``Detector.predict`` results: boxes, scores, labels) that have no partner in
    the other, matched as sets: same label, score within ``LOGIT_RTOL[dtype]`` on the logit, box overlapping at IoU >=
    ``iou`` (the NMS threshold: a pair of near-equal scores may keep either box) or within 0.5 px (clipped, empty
    boxes). Detections within the tolerance of the lowest score kept by a run that returned ``limit`` (cut at
    detections_per_img) may be in one and not the other. Returns one line per detection left without a partner."""
    import math

    from torchvision.ops import box_iou

    rtol = LOGIT_RTOL[None if dtype is None else str(dtype).replace("torch.", "")]

    def logit(p):
        p = min(max(float(p), 1e-7), 1 - 1e-7)
        return math.log(p / (1 - p))

    floor = max([logit(r["scores"][-1]) for r in (a, b) if len(r["scores"]) >= limit], default=-math.inf)
    lonely = []
    for name, x, y in (("first", a, b), ("second", b, a)):
        overlap = box_iou(x["boxes"].float(), y["boxes"].float())
        close = (x["boxes"][:, None, :].float() - y["boxes"][None, :, :].float()).abs().amax(-1) <= 0.5
        free = set(range(len(y["scores"])))
        for i in range(len(x["scores"])):
            s = logit(x["scores"][i])
            tol = rtol * max(1.0, abs(s))
            if s <= floor + tol:
                continue  # at the cut: may be either side of it
            fits = [j for j in free if int(y["labels"][j]) == int(x["labels"][i]) and abs(logit(y["scores"][j]) - s) <= tol
                    and (overlap[i, j] >= iou or close[i, j])]
            if fits:
                free.remove(max(fits, key=lambda j: (bool(close[i, j]), float(overlap[i, j]))))
            else:
                lonely.append(f"{name} #{i}: label {int(x['labels'][i])} score {float(x['scores'][i]):.6g} "
                              f"box {[round(v, 2) for v in x['boxes'][i].tolist()]}")
    return lonely


def free_port() -> int:
    """A TCP port nobody listens on now (the rendezvous of a multi-process test run)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
