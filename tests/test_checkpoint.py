"""Atomic checkpoint writes and clear load errors."""

import os

import pytest
import torch

from retinanet.checkpoint import CheckpointError, atomic_save, atomic_write_json, load_checkpoint


def test_round_trip_with_weights_only(tmp_path):
    ckpt = {"model": {"w": torch.arange(3.0)}, "epoch": 2, "label_map": {"class_names": ["a"]}}
    atomic_save(ckpt, tmp_path / "last.pt")
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert loaded["epoch"] == 2 and torch.equal(loaded["model"]["w"], torch.arange(3.0))


def test_failed_write_keeps_previous_file(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save({"model": {}, "epoch": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom in the middle of writing")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"model": {}, "epoch": 2, "bad": Unpicklable()}, path)
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="missing.pt' does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt' cannot be read: not a PyTorch checkpoint"):
        load_checkpoint(bad)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no 'model' entry"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save({"model": {}, "hook": print}, tmp_path / "code.pt")  # a pickled function: never loaded
    with pytest.raises(CheckpointError, match="refused because loading them could run code") as err:
        load_checkpoint(tmp_path / "code.pt")
    assert "weights_only" not in str(err.value)  # torch's advice to load unsafely is never passed on


def test_json_is_atomic_and_readable(tmp_path):
    atomic_write_json({"AP": 0.5}, tmp_path / "metrics.json")
    assert (tmp_path / "metrics.json").read_text().strip().startswith("{")
