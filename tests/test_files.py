"""Atomic writes (retinanet.files): a failed write keeps the previous file and leaves no temporary file."""

import json
import os

import pytest
import torch

from retinanet.checkpoint import load_checkpoint
from retinanet.files import atomic_link, atomic_save, atomic_write_json, atomic_write_text, remove_stale_temps


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


def test_json_and_text_are_written_whole(tmp_path):
    atomic_write_json({"AP": 0.5, "missing": float("nan")}, tmp_path / "metrics.json")
    assert (tmp_path / "metrics.json").read_text().startswith('{\n  "AP": 0.5')
    atomic_write_json([1, 2], tmp_path / "sub" / "compact.json", indent=None)  # folders are made
    assert (tmp_path / "sub" / "compact.json").read_text() == "[1, 2]"
    atomic_write_text("caf\u00e9\n", tmp_path / "card.md")
    assert (tmp_path / "card.md").read_bytes() == "caf\u00e9\n".encode()
    assert json.loads((tmp_path / "metrics.json").read_text())["AP"] == 0.5


def test_link_keeps_the_version_it_was_made_from(tmp_path):
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    atomic_save({"model": {"w": torch.zeros(2)}, "epoch": 1}, last)
    atomic_link(last, best)
    atomic_save({"model": {"w": torch.ones(2)}, "epoch": 2}, last)  # a new file replaces last.pt
    assert load_checkpoint(best)["epoch"] == 1 and load_checkpoint(last)["epoch"] == 2


def test_stale_temporary_files_are_removed(tmp_path):
    (tmp_path / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "last.pt").write_bytes(b"kept")
    assert remove_stale_temps(tmp_path) == [".last.pt.abc123.tmp"]
    assert os.listdir(tmp_path) == ["last.pt"]
