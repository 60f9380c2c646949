"""Training from Python (``retinanet.train``): the command's config tree, run dir and files; the best checkpoint
loads into a ``Detector``; two runs in one process; a bad override is a ``ConfigError``, not an exit."""

import json
import logging

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from retinanet import Detector, train
from retinanet.errors import ConfigError

from conftest import compose_train, tiny_train_overrides


def one_epoch(root) -> list[str]:
    return tiny_train_overrides(root, out_epochs=1) + ["trainer.threads=1"]


@pytest.mark.slow
def test_train_writes_the_run_dir_and_its_best_checkpoint_detects(tiny_shapes, tmp_path):
    run = train(overrides=one_epoch(tiny_shapes) + ["loss=focal"], out_dir=tmp_path / "run")
    assert run.run_dir == tmp_path / "run" and run.last == run.run_dir / "last.pt" and run.last.is_file()
    assert run.best == run.run_dir / "best.pt" and run.best.is_file()
    metrics = json.loads((run.run_dir / "metrics.json").read_text())
    assert run.metrics["stats"] == metrics["final"]["stats"] and run.ap == metrics["final"]["stats"]["AP"]
    assert "loss: sigmoid focal alpha 0.25, gamma 2" in (run.run_dir / "train.log").read_text()  # loss=focal chosen
    log = (run.run_dir / "train.log").read_text()
    assert "[retinanet.trainer][INFO] - epoch 1 (the last): loss" in log and "data: 48 train / 16 val images" in log
    assert (run.run_dir / "config.yaml").is_file() and list((run.run_dir / "tensorboard").iterdir())
    assert not logging.getLogger("retinanet").handlers  # the log file handler is gone with the call

    detector = Detector.from_checkpoint(run.best, device="cpu")
    image = next((tiny_shapes / "val").iterdir())
    result = detector.predict(str(image))
    assert result["boxes"].shape[1] == 4 and len(result["scores"]) == len(result["class_names"])
    assert set(result["class_names"]) <= set(detector.class_names)


@pytest.mark.slow
def test_train_twice_in_one_process_makes_two_run_dirs_like_the_command(tiny_shapes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = train(overrides=one_epoch(tiny_shapes))
    second = train(overrides=one_epoch(tiny_shapes) + ["optim.lr=0.002"])
    assert first.run_dir != second.run_dir  # a suffix _2 if both started within one second
    for run in (first, second):
        assert run.run_dir.resolve().parent == tmp_path / "outputs" / "shapes"  # outputs/<data.name>/<time>
        assert (run.run_dir / "metrics.json").is_file() and (run.run_dir / "train.log").is_file()
    assert torch.load(second.last, weights_only=True)["config"]["optim"]["lr"] == 0.002
    assert not GlobalHydra.instance().is_initialized()  # Hydra's global state is left as it was
    assert compose_train(["trainer.epochs=2"]).trainer.epochs == 2  # and composing still works


@pytest.mark.parametrize("overrides, message", [
    (["trainer.epoch=3"], "Could not override 'trainer.epoch'"),
    (["loss=nope"], "Could not find 'loss/nope' Available options in 'loss': focal"),
    (["trainer.batch_size=0"], "trainer.batch_size=0 must be >= 1"),
])
def test_a_bad_override_raises_a_config_error(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as err:
        train(overrides=overrides, out_dir=tmp_path / "run")
    assert "\n" not in str(err.value)  # one line, as the command prints it
