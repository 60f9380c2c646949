"""``model.init_from``: load what fits from our checkpoints and torchvision's, re-initialise the class predictor."""

import logging
import math

import pytest
import torch
from hydra.utils import instantiate
from torchvision.models.detection import RetinaNet_ResNet50_FPN_Weights, retinanet_resnet50_fpn

import retinanet.trainer as trainer
from retinanet.config import validate_train_config
from retinanet.detector import Detector
from retinanet.errors import UserError
from retinanet.files import atomic_save
from retinanet.model import RetinaNet
from retinanet.model.init import CLASS_PREDICTOR, init_from
from retinanet.torchvision_weights import coco_label_map, convert_torchvision_state_dict
from retinanet.torchvision_weights import main as convert_main

from conftest import compose_train, tiny_train_overrides

PRIOR_LOGIT = -math.log(0.99 / 0.01)


def tiny(num_classes=3, seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(num_classes=num_classes, backbone="resnet18", norm="bn", frozen_stages=0, fpn_channels=32,
                head_width=32, head_depth=2)
    args.update(kw)
    return RetinaNet(**args).eval()


@pytest.fixture(scope="module")
def tv_checkpoint(tmp_path_factory):
    """A locally saved torchvision retinanet_resnet50_fpn (91 classes) and its state dict."""
    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    with torch.no_grad():
        for p in tv.parameters():
            p.add_(0.01)  # differ from any fresh initialisation
    path = tmp_path_factory.mktemp("tv") / "tv_v1.pth"
    torch.save(tv.state_dict(), path)
    return path, tv.state_dict()


def test_torchvision_checkpoint_into_another_class_count(tv_checkpoint, caplog):
    """The torchvision checkpoint -> the v1 preset with 5 classes: all but the class predictor loaded."""
    path, tv_state = tv_checkpoint
    model = instantiate(compose_train(["model=torchvision_v1"]).model.net, num_classes=5)
    with torch.no_grad():
        model.cls_head.predictor.bias.fill_(3.0)  # proves the predictor is re-initialised, not left alone
    with caplog.at_level(logging.INFO, logger="retinanet.model.init"):
        report = init_from(model, str(path))

    assert report.kind == "torchvision v1"
    assert report.reinitialised == list(CLASS_PREDICTOR)
    reason = report.skipped[CLASS_PREDICTOR[0]]
    assert "shape (819, 256, 3, 3) in the checkpoint, (45, 256, 3, 3) in the model" in reason
    own = {k for k in report.skipped if not k.endswith("num_batches_tracked")}
    assert own == set(CLASS_PREDICTOR)  # torchvision's BatchNorm2d counters are the only other skipped tensors
    expected = convert_torchvision_state_dict(tv_state)
    state = model.state_dict()
    assert sorted(report.loaded) == sorted(k for k in state if k not in CLASS_PREDICTOR)
    assert report.not_in_checkpoint == []
    assert all(torch.equal(state[k], expected[k]) for k in report.loaded)
    assert torch.equal(model.cls_head.predictor.bias, torch.full((45,), PRIOR_LOGIT))
    assert abs(model.cls_head.predictor.weight.std().item() - 0.01) < 1e-3
    text = caplog.text
    assert "re-initialised cls_head.predictor.weight, cls_head.predictor.bias" in text
    assert f"loaded {len(report.loaded)} of {len(state)} model tensors: backbone.conv1 (1)" in text
    assert "fpn.extra (4)" in text and "box_head.predictor (2)" in text
    assert "skipped" in text and "53 BatchNorm num_batches_tracked counters" in text


def test_convert_cli_writes_a_checkpoint_evaluate_can_load(tv_checkpoint, tmp_path):
    """``python -m retinanet.torchvision_weights``: 91 outputs -> the 80 COCO categories, loadable by scripts/evaluate.py."""
    path, tv_state = tv_checkpoint
    out = tmp_path / "tv_v1_coco.pt"
    convert_main([str(path), str(out)])
    detector = Detector.from_checkpoint(out, "cpu")  # what scripts/evaluate.py does: rebuild from the checkpoint's own config
    assert detector.category_ids == coco_label_map()["category_ids"] and len(detector.category_ids) == 80
    assert detector.class_names[:3] == ["person", "bicycle", "car"] and detector.class_names[-1] == "toothbrush"
    assert (detector.min_size, detector.max_size, detector.size_divisible) == (800, 1333, 32)
    assert detector.anchors.strides_from_image and detector.postprocess.detections_per_img == 300
    weight = detector.model.cls_head.predictor.weight  # [9 * 80, 256, 3, 3]
    tv_weight = tv_state["head.classification_head.cls_logits.weight"]  # [9 * 91, 256, 3, 3]
    for anchor, (label, cat_id) in ((0, (0, 1)), (4, (79, 90)), (8, (11, 13))):  # person, toothbrush, stop sign
        assert torch.equal(weight[anchor * 80 + label], tv_weight[anchor * 91 + cat_id])
    assert torch.equal(detector.model.backbone.layer3[2].conv2.weight, tv_state["backbone.body.layer3.2.conv2.weight"])


def test_torchvision_weights_name_without_downloading(tv_checkpoint, monkeypatch):
    """A weights name goes through torchvision's enum; here its download is replaced (nothing is fetched)."""
    _, tv_state = tv_checkpoint
    name = "RetinaNet_ResNet50_FPN_Weights.COCO_V1"
    monkeypatch.setattr(RetinaNet_ResNet50_FPN_Weights, "get_state_dict", lambda self, **kw: tv_state)
    model = tiny(91, fpn_channels=256, head_width=256, head_depth=4, p6_from="p5")  # a ResNet-18 v1: part fits
    report = init_from(model, name)
    assert report.kind == "torchvision v1" and report.reinitialised == []
    assert {"cls_head.predictor.weight", "box_head.tower.6.weight", "fpn.extra.0.weight", "fpn.output.2.weight",
            "backbone.conv1.weight"} <= set(report.loaded)
    assert report.skipped["backbone.layer1.0.conv3.weight"] == "not in the model"  # ResNet-50 only
    assert report.skipped["fpn.lateral.2.weight"] == ("shape (256, 2048, 1, 1) in the checkpoint, "
                                                      "(256, 512, 1, 1) in the model")

    def offline(self, **kw):
        raise OSError("network unreachable")

    monkeypatch.setattr(RetinaNet_ResNet50_FPN_Weights, "get_state_dict", offline)
    with pytest.raises(UserError, match="cannot download .*retinanet_resnet50_fpn_coco-eeacb38b.pth.*local path"):
        init_from(model, name)
    with pytest.raises(UserError, match="'RetinaNet_ResNet50_FPN_Weights.NOPE' is not a torchvision weights name"):
        init_from(model, "RetinaNet_ResNet50_FPN_Weights.NOPE")


def test_our_checkpoint_same_and_other_class_count(tmp_path):
    source = tiny(3, seed=1)
    path = tmp_path / "last.pt"
    atomic_save({"model": source.state_dict(), "config": {}, "label_map": {}}, path)
    images = torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8)

    same = tiny(3, seed=2)
    report = init_from(same, str(path))
    assert report.kind == "ours" and report.skipped == {} and report.reinitialised == []
    assert len(report.loaded) == len(source.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(same(images).cls_logits, source(images).cls_logits, rtol=0, atol=0)

    more = tiny(5, seed=2)
    report = init_from(more, str(path), prior_prob=0.05)
    assert report.reinitialised == list(CLASS_PREDICTOR)
    assert torch.equal(more.cls_head.predictor.bias, torch.full((45,), -math.log(0.95 / 0.05)))
    with torch.no_grad():
        torch.testing.assert_close(more(images).box_deltas, source(images).box_deltas, rtol=0, atol=0)

    narrow = tiny(3, seed=2, head_width=16)
    report = init_from(narrow, str(path))
    assert "cls_head.tower.0.weight" in report.skipped and "box_head.predictor.weight" in report.skipped
    assert "(32, 32, 3, 3) in the checkpoint, (16, 32, 3, 3) in the model" in report.skipped["cls_head.tower.0.weight"]
    assert "backbone.layer4.1.conv2.weight" in report.loaded and "fpn.extra.1.weight" in report.loaded


def test_errors_name_the_source(tmp_path):
    with pytest.raises(UserError, match="model.init_from=.*no_such.pt"):  # a message, not a traceback
        init_from(tiny(), str(tmp_path / "no_such.pt"))
    unrelated = tmp_path / "unrelated.pt"
    torch.save({"encoder.weight": torch.zeros(3)}, unrelated)
    with pytest.raises(UserError, match="unrelated.pt.*no tensor fits this model"):
        init_from(tiny(), str(unrelated))
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(UserError, match="notes.txt.*cannot be read"):
        init_from(tiny(), str(text))


@pytest.mark.parametrize("preset", ["retinanet_r18_cpu", "retinanet_r50", "retinanet_r101", "torchvision_v1",
                                    "torchvision_v2"])
def test_every_model_preset_has_init_from(preset):
    cfg = compose_train([f"model={preset}"])
    validate_train_config(cfg)
    assert "init_from" in cfg.model and cfg.model.init_from is None


class Stop(Exception):
    pass


def test_trainer_initialises_the_built_model(tiny_shapes, tmp_path, monkeypatch):
    overrides = tiny_train_overrides(tiny_shapes, out_epochs=1)
    cfg = compose_train(overrides)
    source = instantiate(cfg.model.net, num_classes=2, num_anchors=9)  # 2 classes; the dataset has 6
    path = tmp_path / "start.pt"
    atomic_save({"model": source.state_dict()}, path)
    reports = []

    def init_then_stop(model, where):
        reports.append(init_from(model, where))
        raise Stop  # nothing more to see: the rest of training is tested elsewhere

    monkeypatch.setattr(trainer, "init_from", init_then_stop)
    with pytest.raises(Stop):
        trainer.run(compose_train(overrides + [f"model.init_from={path}"]), tmp_path / "run")
    (report,) = reports
    assert report.source == str(path) and report.reinitialised == list(CLASS_PREDICTOR)
    assert len(report.loaded) == len(source.state_dict()) - 2
