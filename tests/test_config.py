"""Config composition and validation: the trainer's own keys are checked by validate_train_config, every built
component by its constructor; either way a mistake is reported as one ConfigError naming group, key and value."""

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError
from torch import nn

from retinanet import recipe
from retinanet.config import CONFIGS, build, validate_train_config
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


GROUPS = ("data", "model", "loss", "optim", "schedule", "trainer", "recipe", "postprocess", "evaluation")


def presets(group: str) -> list[str]:
    return sorted(path.stem for path in (CONFIGS / group).glob("*.yaml"))


def nested_groups() -> list[str]:
    """``model/anchors``, ``data/augment``, ``loss/matcher``: groups a preset selects in its defaults list."""
    return sorted(f"{group}/{sub.name}" for group in GROUPS for sub in (CONFIGS / group).iterdir() if sub.is_dir())


def test_the_tree_has_the_groups_and_nested_groups_the_docs_name():
    assert set(presets("experiment")) == {"own_data", "coco"}
    assert nested_groups() == ["data/augment", "loss/matcher", "model/anchors"]


def test_the_defaults_are_the_cpu_demo():
    cfg = compose_train()
    assert set(GROUPS) < set(cfg.keys())
    assert (cfg.data.name, cfg.model.name, cfg.recipe.name) == ("shapes", "retinanet_r18_cpu", "none")
    assert cfg.loss == compose_train(["loss=focal_cpu"]).loss and cfg.trainer == compose_train(["trainer=cpu"]).trainer


@pytest.mark.parametrize("group", GROUPS)
def test_no_preset_changes_another_group(group):
    bare = OmegaConf.to_container(compose_train(), resolve=False)
    for preset in presets(group):
        cfg = OmegaConf.to_container(compose_train([f"{group}={preset}"]), resolve=False)
        for other in set(bare) - {group}:
            assert cfg[other] == bare[other], f"{group}={preset} changes {other}"


def test_a_preset_that_inherits_another_says_only_what_differs():
    r50, r101 = compose_train(["model=retinanet_r50"]).model, compose_train(["model=retinanet_r101"]).model
    assert (r101.name, r101.net.backbone, r101.net.weights) == ("retinanet_r101", "resnet101",
                                                               "ResNet101_Weights.IMAGENET1K_V1")
    assert {k: v for k, v in r101.net.items() if k not in ("backbone", "weights")} == \
        {k: v for k, v in r50.net.items() if k not in ("backbone", "weights")}
    assert r101.anchors == r50.anchors and list(r50.anchors.sizes) == [32, 64, 128, 256, 512]
    demo = compose_train().model.anchors  # the paper's anchors with halved sizes
    assert list(demo.sizes) == [16, 32, 64, 128, 256]
    assert {k: v for k, v in demo.items() if k != "sizes"} == {k: v for k, v in r50.anchors.items() if k != "sizes"}
    tv1, tv2 = compose_train(["model=torchvision_v1"]).model, compose_train(["model=torchvision_v2"]).model
    assert tv1.anchors == tv2.anchors and tv1.anchors.offset == 0.0 and "sizes_per_level" in tv1.anchors
    loss_v1, loss_v2 = compose_train(["loss=torchvision_v1"]).loss, compose_train(["loss=torchvision_v2"]).loss
    assert (loss_v1.box_loss, loss_v2.box_loss) == ("l1", "giou")
    assert {k: v for k, v in loss_v2.items() if k != "box_loss"} == {k: v for k, v in loss_v1.items() if k != "box_loss"}
    assert loss_v1.matcher.crowd_ioa == 2.0 and (loss_v1.matcher.fg_iou, loss_v1.matcher.bg_iou) == (0.5, 0.4)
    augments = {compose_train([f"data={name}"]).data.augment.hflip_prob for name in presets("data")}
    assert augments == {0.5}


def test_the_demo_loss_and_loop_and_the_papers():
    paper = compose_train(["loss=focal"]).loss
    assert (paper.gamma, paper.alpha, paper.matcher.fg_iou, paper.matcher.bg_iou) == (2.0, 0.25, 0.5, 0.4)
    demo = compose_train().loss
    assert (demo.gamma, demo.alpha, demo.matcher.fg_iou, demo.matcher.bg_iou) == (0.5, 0.5, 0.35, 0.25)
    changed = {"gamma", "alpha", "matcher"}
    assert {k: v for k, v in demo.items() if k not in changed} == {k: v for k, v in paper.items() if k not in changed}
    assert demo.matcher.allow_low_quality == paper.matcher.allow_low_quality
    assert compose_train(["+sweep=demo"]).loss == paper  # `make sweep-demo` varies gamma / alpha of the paper's loss
    assert compose_train(["loss=torchvision_v1"]).loss.box_loss == "l1"
    tuned = compose_train(["loss.gamma=3", "loss.matcher.fg_iou=0.45"]).loss
    assert (tuned.gamma, tuned.alpha, tuned.matcher.fg_iou) == (3, 0.5, 0.45)

    default = compose_train(["trainer=default"]).trainer
    assert (default.epochs, default.time_limit, default.precision, default.channels_last) == (6, None, "32", True)
    loop = compose_train().trainer
    assert (loop.epochs, loop.time_limit, loop.precision, loop.channels_last) == (14, 660, "auto", False)
    changed = {"epochs", "time_limit", "precision", "channels_last"}
    assert {k: v for k, v in loop.items() if k not in changed} == {k: v for k, v in default.items() if k not in changed}
    assert compose_train(["+sweep=demo"]).trainer.time_limit is None  # `make sweep-demo` keeps its measured loop
    assert compose_train(["trainer.time_limit=null", "trainer.epochs=20"]).trainer.epochs == 20  # keys win


OWN = ["data.train_ann=a.json", "data.train_images=img", "data.val_ann=b.json", "data.val_images=img"]


def test_experiment_own_data_is_data_custom_with_recipe_auto_and_the_papers_matcher():
    cfg = compose_train(["experiment=own_data", *OWN])
    demo = compose_train()
    assert (cfg.data.name, cfg.recipe.name, cfg.model.name) == ("custom", "auto", "retinanet_r18_cpu")
    autos = ["data.min_size", "data.max_size", "model.anchors.scale", "optim.lr", "optim.weight_decay",
             "trainer.epochs"]
    assert recipe.auto_keys(cfg) == autos  # every key recipe=auto can fill
    assert (cfg.loss.matcher.fg_iou, cfg.loss.matcher.bg_iou) == (0.5, 0.4)
    assert {k: v for k, v in cfg.loss.items() if k != "matcher"} == {k: v for k, v in demo.loss.items() if k != "matcher"}
    assert {k: v for k, v in cfg.trainer.items() if k != "epochs"} == {k: v for k, v in demo.trainer.items()
                                                                       if k != "epochs"}
    assert cfg.schedule == demo.schedule and cfg.postprocess == demo.postprocess
    # the command line wins: a value given is not auto, a group given replaces the demo's
    mine = compose_train(["experiment=own_data", *OWN, "optim.lr=0.001", "data.max_size=512", "model=retinanet_r50"])
    assert recipe.auto_keys(mine) == ["data.min_size", "model.anchors.scale", "optim.weight_decay", "trainer.epochs"]
    assert mine.model.net.backbone == "resnet50" and mine.model.anchors.scale == "auto"
    assert list(mine.model.anchors.sizes) == [32, 64, 128, 256, 512]  # the preset's own: the base of the fit


def test_data_custom_without_the_recipe_says_what_to_set(tmp_path):
    paths = [f"data.{key}={tmp_path}" for key in ("train_ann", "train_images", "val_ann", "val_images")]
    with pytest.raises(ConfigError, match="data.min_size is mandatory .* or use experiment=own_data"):
        validate_train_config(compose_train(["data=custom", *paths]), allow_auto=True)
    validate_train_config(compose_train(["data=custom", *paths, "data.min_size=320", "data.max_size=320"]))
    left = compose_train(["experiment=own_data", *paths, "recipe=none"])  # autos left without the recipe
    with pytest.raises(ConfigError, match="data.min_size=auto needs recipe=auto.* or use experiment=own_data"):
        validate_train_config(left, allow_auto=True)


def test_experiment_coco_is_the_papers_setup():
    cfg = compose_train(["experiment=coco", "data.root=/datasets/coco"])
    assert (cfg.data.name, cfg.data.min_size, cfg.data.max_size) == ("coco", 800, 1333)
    assert cfg.model == compose_train(["model=retinanet_r50"]).model
    assert cfg.loss == compose_train(["loss=focal"]).loss
    assert cfg.schedule == compose_train(["schedule=multistep"]).schedule
    assert (cfg.optim._target_, cfg.optim.lr, cfg.optim.reference_batch_size) == ("retinanet.optim.sgd", 0.01, 16)
    assert cfg.trainer.epochs == 12 and cfg.trainer.precision == "32" and cfg.trainer.time_limit is None
    assert compose_train(["experiment=coco", "loss=focal_cpu"]).loss.gamma == 0.5  # the command line wins


@pytest.mark.parametrize("overrides", [[], ["experiment=own_data", *OWN], ["model=torchvision_v1", "loss=focal"]])
def test_inspect_sees_what_training_sees(overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        inspect = compose(config_name="inspect", overrides=overrides)
    own = {"split", "max_images", "num_samples", "output", "progress"}  # retinanet-inspect's own settings
    assert own < set(inspect.keys())
    assert OmegaConf.masked_copy(inspect, list(set(inspect.keys()) - own)) == compose_train(overrides)


def test_the_run_log_names_each_groups_choice():
    from retinanet.commands.train import describe_choices

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=own_data", "loss=focal"], return_hydra_config=True)
    line = describe_choices(cfg.hydra.runtime.choices)
    assert line.startswith("data=custom data/augment=flip model=retinanet_r18_cpu model/anchors=paper loss=focal ")
    assert line.endswith(" recipe=auto postprocess=default evaluation=default logger=tensorboard experiment=own_data")
    assert "hydra" not in line


def real_files(tmp_path) -> list[str]:
    """Overrides that make every data preset's paths exist (validation checks them)."""
    for name in ("annotations/instances_train2017.json", "annotations/instances_val2017.json", "train2017",
                 "val2017", "a.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    return [f"data.root={tmp_path}"]


def every_choice() -> list[list[str]]:
    """One override list per shipped preset: each file of each group, nested group and experiment."""
    choices = [[f"{group}={name}"] for group in GROUPS for name in presets(group)]
    choices += [[f"{group}={name}"] for group in nested_groups() for name in presets(group)]
    return choices + [[f"experiment={name}"] for name in presets("experiment")]


@pytest.mark.parametrize("choice", every_choice(), ids=lambda c: c[0])
def test_every_key_of_every_shipped_preset_composes_validates_and_builds(choice, tmp_path):
    extra = real_files(tmp_path)
    if choice[0] in ("data=custom", "experiment=own_data"):  # no data.root: four paths
        extra = [f"data.{key}={tmp_path / 'a.json'}" for key in ("train_ann", "train_images", "val_ann", "val_images")]
    if choice[0] == "data=custom":
        extra += ["data.min_size=320", "data.max_size=320"]
    cfg = compose_train(choice + extra)
    validate_train_config(cfg, allow_auto=cfg.recipe.name == "auto")  # no key unknown, every value valid
    if recipe.auto_keys(cfg):
        return  # recipe=auto fills them before anything is built
    # every key of a built group is an argument of its constructor
    anchors = build(cfg.model.anchors)
    build(cfg.loss, num_classes=3, class_counts=[1, 2, 3])
    build(cfg.postprocess)
    optimizer = build(cfg.optim, model=nn.Linear(2, 2), global_batch=8)
    build(cfg.schedule, optimizer=optimizer, total_steps=10)
    if choice[0].startswith(("model=", "experiment=")):
        net = OmegaConf.merge(cfg.model.net, {"weights": None})  # nothing downloaded
        build(net, num_classes=3, num_anchors=anchors.num_anchors_per_location)


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
    ("+data.augment.flip=0.5", "data.augment.flip is not a setting of data"),  # a nested group's keys are known
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
    # the run log names each group's choice first: the CPU demo's defaults
    assert ("config groups: data=shapes data/augment=flip model=retinanet_r18_cpu model/anchors=paper loss=focal_cpu "
            "loss/matcher=paper optim=adamw schedule=cosine trainer=cpu recipe=none postprocess=default "
            "evaluation=default logger=tensorboard\n") in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
