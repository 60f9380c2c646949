"""Reading checkpoints and weights files: our checkpoints, the other layouts in use, clear errors naming the file."""

import pytest
import torch

from retinanet.checkpoint import CheckpointError, load_checkpoint, read_state_dict
from retinanet.files import atomic_save


def test_round_trip_with_weights_only(tmp_path):
    ckpt = {"model": {"w": torch.arange(3.0)}, "epoch": 2, "label_map": {"class_names": ["a"]}}
    atomic_save(ckpt, tmp_path / "last.pt")
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert loaded["epoch"] == 2 and torch.equal(loaded["model"]["w"], torch.arange(3.0))


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


def test_read_state_dict_reads_every_layout(tmp_path):
    raw, ema = {"w": torch.zeros(2), "n": torch.tensor(3)}, {"w": torch.ones(2), "n": torch.tensor(3)}
    layouts = {
        "bare.pth": (raw, raw),
        "under_model.pth": ({"model": raw, "epoch": 7}, raw),  # torchvision's reference scripts
        "ours.pt": ({"model": raw, "config": {}, "label_map": {}}, raw),
        "ours_ema.pt": ({"model": raw, "ema": {"model": ema, "decay": 0.9}, "config": {}}, ema),  # what scored
        "with_extras.pth": ({**raw, "note": "not a tensor"}, raw),
    }
    for name, (content, expected) in layouts.items():
        torch.save(content, tmp_path / name)
        got = read_state_dict(tmp_path / name)
        assert set(got) == {"w", "n"} and all(torch.equal(got[k], expected[k]) for k in got), name


def test_read_state_dict_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="nothing.pt' does not exist"):
        read_state_dict(tmp_path / "nothing.pt")
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(CheckpointError, match="notes.txt' cannot be read"):
        read_state_dict(tmp_path / "notes.txt")
    torch.save({"model": {"lr": 0.1}}, tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="empty.pt' holds no state dict"):
        read_state_dict(tmp_path / "empty.pt")
