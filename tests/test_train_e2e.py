"""End to end: the composed Hydra config trains a few iterations on tiny data, the loss falls,
and the run dir holds checkpoints, TensorBoard events, metrics and the resolved config."""

import json
import logging

import pytest
import torch

from retinanet.checkpoint import load_checkpoint
from retinanet.trainer import run

from conftest import compose_train, tiny_train_overrides


@pytest.mark.slow
def test_training_reduces_loss_and_writes_outputs(tiny_shapes, tmp_path, caplog):
    cfg = compose_train(tiny_train_overrides(tiny_shapes, out_epochs=4) + ["optim.lr=0.003"])
    with caplog.at_level(logging.INFO, logger="retinanet.trainer"):
        ap = run(cfg, tmp_path)
    assert "loss: sigmoid focal alpha 0.5, gamma 0.5; box smooth_l1" in caplog.text  # the preset's loss, named
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    losses = [e["train"]["loss"] for e in metrics["history"]]
    assert len(losses) == 4
    assert losses[-1] < 0.8 * losses[0], losses
    assert 0.0 <= ap <= 1.0 and metrics["final"]["stats"]["AP"] == ap
    assert metrics["train_images_per_s"] > 0
    for name in ("last.pt", "best.pt", "config.yaml"):
        assert (tmp_path / name).is_file(), name
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["epoch"] == 4 and ckpt["label_map"]["category_ids"] == sorted(ckpt["label_map"]["category_ids"])
    assert ckpt["config"]["trainer"]["epochs"] == 4
    assert all(isinstance(v, torch.Tensor) for v in ckpt["model"].values())
