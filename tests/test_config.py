"""Config composition and validation: mistakes are reported by key and value before any work."""

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigAttributeError

from conftest import ROOT, compose_train
from retinanet.config import validate_train_config
from retinanet.errors import ConfigError


def test_default_config_is_valid():
    cfg = compose_train()
    validate_train_config(cfg)
    assert cfg.data.name == "shapes" and cfg.model.net.backbone == "resnet18"


@pytest.mark.parametrize("preset", ["retinanet_r50", "retinanet_r101", "retinanet_r18_cpu"])
def test_model_presets_compose(preset):
    cfg = compose_train([f"model={preset}", "optim=sgd", "schedule=multistep"])
    validate_train_config(cfg)
    assert cfg.model.name == preset


def test_cpu_preset_brings_its_own_loss_and_every_other_model_keeps_the_papers():
    paper = compose_train(["loss=focal"]).loss
    assert (paper.gamma, paper.alpha, paper.matcher.fg_iou, paper.matcher.bg_iou) == (2.0, 0.25, 0.5, 0.4)

    demo = compose_train().loss  # model=retinanet_r18_cpu (the default) swaps in loss=focal_cpu
    assert (demo.gamma, demo.alpha, demo.matcher.fg_iou, demo.matcher.bg_iou) == (0.5, 0.5, 0.35, 0.25)
    changed = {"gamma", "alpha", "matcher"}
    assert {k: v for k, v in demo.items() if k not in changed} == {k: v for k, v in paper.items() if k not in changed}
    assert demo.matcher.allow_low_quality == paper.matcher.allow_low_quality

    for preset in ("retinanet_r50", "retinanet_r101"):
        assert compose_train([f"model={preset}"]).loss == paper
    assert compose_train(["+sweep=demo"]).loss == paper  # `make sweep-demo` varies gamma / alpha of the paper's loss
    # the command line wins over the preset's choice, group and keys alike
    assert compose_train(["loss=torchvision_v1"]).loss.box_loss == "l1"
    tuned = compose_train(["loss.gamma=3", "loss.matcher.fg_iou=0.45"]).loss
    assert (tuned.gamma, tuned.alpha, tuned.matcher.fg_iou) == (3, 0.5, 0.45)


def test_cpu_preset_brings_its_own_loop_and_every_other_model_keeps_the_default():
    default = compose_train(["trainer=default"]).trainer
    assert (default.epochs, default.time_limit, default.precision, default.channels_last) == (6, None, "32", True)

    demo = compose_train().trainer  # model=retinanet_r18_cpu (the default) swaps in trainer=cpu
    assert (demo.epochs, demo.time_limit, demo.precision, demo.channels_last) == (14, 660, "auto", False)
    changed = {"epochs", "time_limit", "precision", "channels_last"}
    assert {k: v for k, v in demo.items() if k not in changed} == {k: v for k, v in default.items() if k not in changed}

    for preset in ("retinanet_r50", "retinanet_r101"):
        assert compose_train([f"model={preset}"]).trainer == default
    assert compose_train(["+sweep=demo"]).trainer.time_limit is None  # `make sweep-demo` keeps its measured loop
    assert compose_train(["trainer.time_limit=null", "trainer.epochs=20"]).trainer.epochs == 20  # keys win


def test_the_run_log_names_the_loss_values_and_says_when_they_are_not_the_papers():
    from retinanet.trainer import describe_loss

    demo = describe_loss(compose_train().loss)
    assert demo.startswith("sigmoid focal alpha 0.5, gamma 0.5; box smooth_l1 (beta 0.11); matcher fg_iou 0.35 / bg_iou 0.25")
    assert "(the paper: alpha 0.25, gamma 2, matcher 0.5 / 0.4, i.e. loss=focal)" in demo
    paper = describe_loss(compose_train(["loss=focal"]).loss)
    assert paper == "sigmoid focal alpha 0.25, gamma 2.0; box smooth_l1 (beta 0.11); matcher fg_iou 0.5 / bg_iou 0.4"
    assert "label smoothing 0.1" in describe_loss(compose_train(["loss=focal", "loss.label_smoothing=0.1"]).loss)
    assert "; box l1;" in describe_loss(compose_train(["loss=torchvision_v1"]).loss)


@pytest.mark.parametrize("override, message", [
    ("trainer.epochs=0", "trainer.epochs=0 must be >= 1"),
    ("optim.lr=-1", "optim.lr=-1 must be > 0"),
    ("optim.lr=abc", "optim.lr='abc' must be a number"),
    ("trainer.precision=8", "trainer.precision"),
    ("trainer.time_limit=-5", "trainer.time_limit=-5 must be > 0"),
    ("model.net.backbone=resnet19", "model.net.backbone='resnet19'"),
    ("loss.alpha=1.5", "loss.alpha=1.5"),
    ("loss.matcher.bg_iou=0.6", "loss.matcher.bg_iou=0.6 must be <="),
    ("device=tpu", "device='tpu'"),
    ("data.size_divisible=100", "data.size_divisible=100 must be a multiple of 32"),
    ("data.eval_min_size=0", "data.eval_min_size=0 must be >= 1"),
    ("data.eval_max_size=1.5", "data.eval_max_size=1.5 must be an integer"),
])
def test_bad_values_name_key_and_value(override, message):
    cfg = compose_train([override])
    with pytest.raises(ConfigError) as err:
        validate_train_config(cfg)
    assert message in str(err.value)


def test_mandatory_paths_are_reported():
    cfg = compose_train(["data=coco"])
    with pytest.raises(ConfigError, match="data.root is mandatory"):
        validate_train_config(cfg)
    cfg = compose_train(["data=coco", "data.root=/nonexistent/coco"])
    with pytest.raises(ConfigError, match="/nonexistent/coco/annotations/instances_train2017.json"):
        validate_train_config(cfg)


def test_unknown_key_is_refused():
    with pytest.raises((ConfigCompositionException, ConfigAttributeError), match="optim.lrr"):
        compose_train(["optim.lrr=0.1"])


def test_train_script_reports_bad_override_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/train.py"), "trainer.epochs=0",
                           f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "trainer.epochs=0 must be >= 1" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
