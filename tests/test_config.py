"""Config composition and validation: the trainer's own keys are checked by validate_train_config, every built
component by its constructor; either way a mistake is reported as one ConfigError naming group, key and value."""

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigAttributeError

from retinanet.config import build, validate_train_config
from retinanet.errors import ConfigError

from conftest import ROOT, compose_train


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


def describe(overrides=()) -> str:
    return build(compose_train(list(overrides)).loss, num_classes=3).describe()


def test_the_run_log_names_the_loss_values_and_says_when_they_are_not_the_papers():
    demo = describe()
    assert demo.startswith("sigmoid focal alpha 0.5, gamma 0.5; box smooth_l1 (beta 0.11); matcher fg_iou 0.35 / bg_iou 0.25")
    assert "(the paper: alpha 0.25, gamma 2, matcher 0.5 / 0.4, i.e. loss=focal)" in demo
    paper = describe(["loss=focal"])
    assert paper == "sigmoid focal alpha 0.25, gamma 2; box smooth_l1 (beta 0.11); matcher fg_iou 0.5 / bg_iou 0.4"
    assert "label smoothing 0.1" in describe(["loss=focal", "loss.label_smoothing=0.1"])
    assert "; box l1;" in describe(["loss=torchvision_v1"])


@pytest.mark.parametrize("override, message", [
    ("trainer.epochs=0", "trainer.epochs=0 must be >= 1"),
    ("trainer.precision=8", "trainer.precision"),
    ("trainer.time_limit=-5", "trainer.time_limit=-5 must be > 0"),
    ("trainer.epochs=null", "trainer.epochs=null needs trainer.time_limit"),
    ("device=tpu", "device='tpu'"),
    ("data.size_divisible=100", "data.size_divisible=100 must be a multiple of 32"),
    ("data.eval_min_size=0", "data.eval_min_size=0 must be >= 1"),
    ("data.eval_max_size=1.5", "data.eval_max_size=1.5 must be an integer"),
    ("+trainer.epoch=3", "trainer.epoch is not a setting of trainer"),  # what Hydra suggests after trainer.epoch=3
    ("+data.img_dir=x", "data.img_dir is not a setting of data"),
    ("+model.head=4", "model.head is not a setting of model"),
    ("+foo=1", "foo is not a setting of the training config"),
])
def test_bad_trainer_values_and_unknown_keys_name_key_and_value(override, message):
    cfg = compose_train(["trainer.time_limit=null", override])
    with pytest.raises(ConfigError) as err:
        validate_train_config(cfg)
    assert message in str(err.value)


@pytest.mark.parametrize("group, override, message", [
    ("loss", "loss.alpha=1.5", "loss: alpha=1.5 must be a number in [0, 1]"),
    ("loss", "loss.gamma=-1", "loss: gamma=-1 must be a number >= 0"),
    ("loss", "loss.box_loss=iou", "loss: box_loss='iou' must be one of"),
    ("loss", "loss.matcher.bg_iou=0.6", "loss.matcher: bg_iou=0.6 and fg_iou=0.35: need 0 <= bg_iou <= fg_iou"),
    ("loss", "+loss.foo=1", "loss.foo is not a setting of loss"),
    ("loss", "loss._target_=retinanet.nowhere.Loss", "loss._target_='retinanet.nowhere.Loss' cannot be imported"),
    ("model.net", "model.net.backbone=resnet19", "model.net: backbone='resnet19' is not one of"),
    ("model.net", "model.net.head_norm=bn", "model.net: head_norm='bn' is not one of"),
    ("model.net", "model.net.head_depth=-1", "model.net: head_depth=-1 must be an integer >= 0"),
    ("postprocess", "postprocess.nms_thresh=1.5", "postprocess: nms_thresh=1.5 must be a number in [0, 1]"),
    ("postprocess", "postprocess.detections_per_img=0", "postprocess: detections_per_img=0 must be an integer >= 1"),
])
def test_each_component_checks_its_own_settings_and_the_error_names_group_and_key(group, override, message):
    cfg = compose_train([override])
    validate_train_config(cfg)  # not the trainer's business: the constructor's
    node = cfg.model.net if group == "model.net" else cfg[group]
    kwargs = {"postprocess": {}, "loss": {"num_classes": 3}, "model.net": {"num_classes": 3, "num_anchors": 9}}[group]
    with pytest.raises(ConfigError) as err:
        build(node, **kwargs)
    assert message in str(err.value)


def test_a_new_loss_class_needs_no_validation_code(tmp_path):
    # a loss of the user's own, named in loss._target_ with keys of its own: nothing but its constructor checks it
    cfg = compose_train(["loss=focal", "loss._target_=torch.nn.Identity", "~loss.matcher", "~loss.alpha",
                         "~loss.gamma", "~loss.label_smoothing", "~loss.box_loss", "~loss.beta", "~loss.cls_weight",
                         "~loss.box_weight", "~loss.normalization"])
    validate_train_config(cfg)
    assert type(build(cfg.loss, num_classes=3, class_counts=[1, 2, 3])).__name__ == "Identity"


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


@pytest.mark.slow
def test_train_script_reports_bad_override_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/train.py"), "trainer.epochs=0",
                           f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "trainer.epochs=0 must be >= 1" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
