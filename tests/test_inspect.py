"""Dataset inspection: feature shapes equal the model's, anchor coverage on hand-placed boxes (an
anchor-exact box, a box far smaller than every anchor, a box lost by the resize), statistics,
the suggested alpha, and scripts/inspect_dataset.py end to end (its CLI error handling is the one of
evaluate.py / infer.py, tested in test_evaluate_infer.py)."""

import contextlib
import importlib.util
import io
import json
import math

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from retinanet.anchors import AnchorGenerator, feature_shapes
from retinanet.data import CocoDetection
from retinanet.data.statistics import anchor_coverage, dataset_statistics, format_report, suggested_alpha
from retinanet.losses import alpha_from_counts
from retinanet.matcher import Matcher
from retinanet.model import RetinaNet

from conftest import CONFIGS, ROOT


def test_feature_shapes_match_the_model():
    model = RetinaNet(num_classes=2, backbone="resnet18", weights=None, norm="bn", frozen_stages=0, fpn_channels=8,
                      head_width=8, head_depth=1).eval()
    for hw in [(64, 96), (100, 70), (320, 256), (33, 129)]:  # padded sizes and odd ones
        with torch.no_grad():
            out = model(torch.zeros(1, 3, *hw, dtype=torch.uint8))
        assert feature_shapes(hw) == out.feature_shapes, hw


def write(tmp_path, images, anns, cats=({"id": 1, "name": "big"}, {"id": 2, "name": "tiny"})):
    (tmp_path / "img").mkdir()
    for img in images:
        Image.new("RGB", (img["width"], img["height"])).save(tmp_path / "img" / img["file_name"])
    (tmp_path / "a.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": list(cats)}))
    return CocoDetection(tmp_path / "a.json", tmp_path / "img")


@pytest.fixture
def placed(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "width": 128, "height": 128},
              {"id": 2, "file_name": "b.png", "width": 256, "height": 256},
              {"id": 3, "file_name": "c.png", "width": 64, "height": 64}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [8, 8, 32, 32]},  # = the P4 anchor at (24, 24)
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [60, 60, 2, 2]},  # far below the 16 px anchors
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [64, 64, 60, 60], "iscrowd": 1},  # not counted
            {"id": 4, "image_id": 2, "category_id": 2, "bbox": [10, 10, 1, 1]},  # 0.5 px after the resize: lost
            {"id": 5, "image_id": 3, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 1}]  # only crowd
    return write(tmp_path, images, anns)


def test_anchor_coverage_on_hand_placed_boxes(placed):
    anchors = AnchorGenerator(sizes=(16, 32, 64, 128, 256), offset=0.5)
    cov = anchor_coverage(placed, anchors, Matcher(), 128, 128, 32, progress=False)
    rows = {r["size"]: r for r in cov["buckets"]}
    assert cov["boxes"] == 3 and cov["images_examined"] == 3
    assert rows["32-64"]["boxes"] == 1 and rows["32-64"]["iou_at_fg"] == 1.0
    assert rows["32-64"]["median_best_iou"] == pytest.approx(1.0)
    tiny = rows["0-16"]
    assert tiny["boxes"] == 2
    assert tiny["matched"] == 0.5  # the 2 px box only by the low-quality rule; the lost one never
    assert tiny["iou_at_fg"] == 0.0
    assert tiny["median_best_iou"] == pytest.approx((4 / 256) / 2)  # median of 4/256 (2x2 in a 16x16) and 0
    strict = anchor_coverage(placed, anchors, Matcher(allow_low_quality=False), 128, 128, 32, progress=False)
    assert {r["size"]: r["matched"] for r in strict["buckets"] if r["boxes"]} == {"0-16": 0.0, "32-64": 1.0}
    assert math.isclose(cov["matched"], 2 / 3) and math.isclose(cov["iou_at_fg"], 1 / 3)
    assert cov["anchor_sides"][0] == 16.0

    report = format_report(dataset_statistics(placed), cov, suggested_alpha(placed))
    assert "2 boxes of 0-16 px: only 0% reach IoU >= 0.5" in report and "model.anchors.sizes" in report
    assert "images: 3 (1 without boxes), boxes: 3 (+2 crowd / ignore regions)" in report


def test_statistics_and_alpha(placed):
    stats = dataset_statistics(placed)
    assert stats["boxes_per_class"] == {"big": 1, "tiny": 2} and stats["crowd_boxes"] == 2
    assert stats["images_without_boxes"] == 1  # c.png: only a crowd region
    alpha = suggested_alpha(placed)
    expected = alpha_from_counts([1, 2])
    assert alpha == {"big": pytest.approx(float(expected[0]), abs=1e-4), "tiny": pytest.approx(float(expected[1]),
                                                                                              abs=1e-4)}
    assert alpha["big"] > 0.25 > alpha["tiny"]  # the rarer class weighs its positives more


def test_inspect_script(tiny_shapes, tmp_path):
    spec = importlib.util.spec_from_file_location("script_inspect", ROOT / "scripts" / "inspect_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="inspect", overrides=[f"data.root={tiny_shapes}", "data.generate=null",
                                                        "num_samples=2", "progress=false", "max_images=20"])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        report = module.run(cfg, tmp_path)
    assert json.loads((tmp_path / "inspect.json").read_text())["images"] == 48
    assert report["anchor_coverage"]["images_examined"] == 20
    assert sum(report["boxes_per_class"].values()) == report["boxes"] > 0
    assert "anchor coverage on 20 images" in buf.getvalue() and "alpha" in buf.getvalue()
    samples = sorted((tmp_path / "samples").glob("*.jpg"))
    assert len(samples) == 2
    drawn = np.asarray(Image.open(samples[0]).convert("RGB"), dtype=float)
    plain = np.asarray(Image.open(tiny_shapes / "train" / "000000.png").convert("RGB"), dtype=float)
    assert drawn.shape == plain.shape and np.abs(drawn - plain).max() > 100  # boxes drawn on the image



def test_the_anchor_statistics_keep_a_rare_class_when_they_subsample(tmp_path):
    from retinanet.data.statistics import best_anchor_iou

    images = [{"id": i + 1, "file_name": f"{i}.png", "width": 64, "height": 64} for i in range(50)]
    anns = [{"id": 1000 * i + k + 1, "image_id": i + 1, "category_id": 1, "bbox": [k % 8 * 7, k // 8 * 12, 6, 10]}
            for i in range(50) for k in range(40)]  # 2000 boxes of the common class
    anns += [{"id": 99000 + i, "image_id": i + 1, "category_id": 2, "bbox": [2, 2, 30, 30]} for i in range(0, 50, 5)]
    ds = write(tmp_path, images, anns)
    ious, labels = best_anchor_iou(ds, AnchorGenerator(sizes=(16, 32, 64, 128, 256)), 64, 64, 32, max_boxes=200,
                                   with_labels=True)
    assert len(ious) <= 200 and int((labels == 1).sum()) == 10  # every box of the rare class (uniform: ~1)
    assert int((labels == 0).sum()) == 190  # the rest of the budget to the common class


def test_inspect_shows_what_training_with_the_same_overrides_would_use(tmp_path, monkeypatch):
    from retinanet import recipe
    from retinanet.commands import inspect_dataset

    images = [{"id": i + 1, "file_name": f"{i}.png", "width": 640, "height": 480} for i in range(6)]
    anns = [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [20, 30, 4, 4]} for i in range(6)]
    write(tmp_path, images, anns, cats=({"id": 1, "name": "thing"},))
    paths = [f"data.train_ann={tmp_path / 'a.json'}", f"data.train_images={tmp_path / 'img'}",
             f"data.val_ann={tmp_path / 'a.json'}", f"data.val_images={tmp_path / 'img'}"]
    overrides = ["experiment=own_data", *paths, "data.min_size=480", "device=cpu", "trainer.time_limit=60"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU present: device=cpu still rules
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="inspect", overrides=[*overrides, "num_samples=0", "progress=false"])
        train_cfg = compose(config_name="train", overrides=overrides)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        report = inspect_dataset.run(cfg, tmp_path / "out")
    training = recipe.apply(train_cfg, torch.device("cpu"))  # what retinanet-train does (trainer.prepare)
    assert report["recipe"] == {c.key: {"value": c.value, "reason": c.reason} for c in training}
    assert set(report["recipe"]) == {"data.max_size", "model.anchors.scale", "optim.lr", "optim.weight_decay",
                                     "trainer.epochs"}  # every auto value, the given min_size kept
    assert (cfg.data.min_size, cfg.data.max_size) == (train_cfg.data.min_size, train_cfg.data.max_size) == (480, 640)
    assert report["anchor_coverage"]["anchor_sides"][0] == pytest.approx(16 * train_cfg.model.anchors.scale, abs=0.1)
    assert "recipe=auto fitted to the training set" in buf.getvalue()
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):  # the device's resize cap: device=cpu's
        auto = compose(config_name="inspect", overrides=[*overrides[:-3], "device=cpu", "num_samples=0",
                                                         "progress=false"])
    with contextlib.redirect_stdout(io.StringIO()):
        assert inspect_dataset.run(auto, tmp_path / "out2")["recipe"]["data.max_size"]["value"] == 512  # GPU: 640
