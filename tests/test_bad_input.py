"""Bad input with data.on_error=raise|skip: counted skips of bad records and missing files at build
time, corrupt / truncated images at load time (replaced in training, dropped in evaluation, reported
at the end of every pass, also from DataLoader worker processes, as one line), boxes the loader drops
never reaching evaluation or the pictures, and crowd boxes reaching the loss as ignore regions."""

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torchvision.ops import sigmoid_focal_loss

from retinanet.anchors import AnchorGenerator
from retinanet.cli import user_message
from retinanet.data import CocoDetection, DatasetError, ImageReadError
from retinanet.data.build import SkippingCollate, build_dataset, build_loader
from retinanet.detector import Detector
from retinanet.errors import ConfigError
from retinanet.evaluation import coco_evaluate, ground_truth_as_detections, to_coco_results
from retinanet.losses import RetinaNetLoss
from retinanet.matcher import IGNORE, Matcher

from conftest import ROOT

CATS = [{"id": 3, "name": "cat"}, {"id": 8, "name": "dog"}]


def make_dataset(tmp_path, n=6, size=(48, 40), annotations=None, images=None, bad=()):
    """n images a0.png .. (w x h = size), one box each; file names in ``bad`` are written truncated."""
    img_dir = tmp_path / "img"
    img_dir.mkdir(exist_ok=True)
    images = images if images is not None else [
        {"id": 100 + i, "file_name": f"a{i}.png", "width": size[0], "height": size[1]} for i in range(n)]
    rng = np.random.default_rng(0)
    for img in images:
        if not isinstance(img, dict) or not isinstance(img.get("file_name"), str) or ".." in img["file_name"]:
            continue
        path = img_dir / img["file_name"]
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        if img["file_name"] in bad:
            path.write_bytes(path.read_bytes()[:100])
    if annotations is None:
        annotations = [{"id": i + 1, "image_id": 100 + i, "category_id": 3 if i % 2 else 8,
                        "bbox": [4, 4, 20, 16]} for i in range(n)]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATS}))
    return ann, img_dir


def data_cfg(ann, img_dir, on_error="raise"):
    """A data config whose bad images are found when loaded (data.verify=false: tests/test_verify.py checks them
    up front)."""
    return OmegaConf.create({
        "train_ann": str(ann), "train_images": str(img_dir), "val_ann": str(ann), "val_images": str(img_dir),
        "min_size": 32, "max_size": 64, "on_error": on_error, "verify": False,
        "augment": {"hflip_prob": 0.5, "scale_range": [1.0, 1.0], "translate": 0.0, "color_jitter": 0.0,
                    "min_visibility": 0.3}})


def test_skip_mode_drops_bad_records_and_counts_each_reason(tmp_path, caplog):
    images = [{"id": 1, "file_name": "a0.png", "width": 48, "height": 40},
              {"id": 2, "file_name": "../outside.png", "width": 48, "height": 40},  # escapes the image root
              {"id": 3, "file_name": "a1.png", "width": 48, "height": 40},
              {"id": 3, "file_name": "a2.png", "width": 48, "height": 40},  # duplicate id: both dropped
              {"id": 4, "file_name": "a3.png", "height": 40},  # missing width
              {"id": 5, "file_name": "gone.png", "width": 48, "height": 40},  # file missing
              {"id": 6, "file_name": "a4.png", "width": 48, "height": 40}]
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 1, 10, 10]},
            {"id": 2, "image_id": 2, "category_id": 3, "bbox": [1, 1, 10, 10]},  # of a skipped image
            {"id": 3, "image_id": 77, "category_id": 3, "bbox": [1, 1, 10, 10]},  # unknown image
            {"id": 4, "image_id": 1, "category_id": 99, "bbox": [1, 1, 10, 10]},  # unknown category
            {"id": 5, "image_id": 6, "category_id": 8, "bbox": [1, 1, "w", 10]},  # malformed bbox
            {"id": 6, "image_id": 6, "category_id": 8},  # missing bbox
            {"id": 1, "image_id": 6, "category_id": 8, "bbox": [2, 2, 5, 5]},  # duplicate id
            {"id": 8, "image_id": 5, "category_id": 8, "bbox": [2, 2, 5, 5]},  # of the missing file
            {"id": 9, "image_id": 6, "category_id": 8, "bbox": [2, 2, 5, float("nan")]},  # NaN: dropped box
            {"id": 10, "image_id": 6, "category_id": 3, "bbox": [40, 30, 20, 20]}]  # partly outside: clipped
    ann, img_dir = make_dataset(tmp_path, images=images, annotations=anns)
    (img_dir / "gone.png").unlink()
    with pytest.raises(DatasetError, match=r"ann.json: images\[4\] \(id=4\) is missing field\(s\) \['width'\]"):
        CocoDetection(ann, img_dir)
    with caplog.at_level(logging.WARNING):
        ds = CocoDetection(ann, img_dir, on_error="skip")
    assert ds.skipped == {
        "images with missing fields": 1, "images with a duplicate id": 2, "images outside the image folder": 1,
        "annotations with missing fields": 1, "annotations with a duplicate id": 1,
        "annotations of skipped images": 1, "annotations of unknown images": 1,
        "annotations of unknown categories": 1, "annotations with a malformed bbox": 1,
        "images whose file is missing": 1, "annotations of images whose file is missing": 1}
    text = caplog.text
    for part in ("skipped 1 images outside the image folder", "'../outside.png'", "field 'category_id'=99",
                 "skipped 2 images with a duplicate id", "images[2, 3] share the id 3",
                 "field 'file_name'='gone.png' not found", "ann.json"):
        assert part in text, part
    assert ds.image_ids == [1, 6]
    assert ds.box_counts["non-finite"] == 1 and ds.box_counts["clipped"] == 1
    np.testing.assert_array_equal(ds[1]["boxes"], [[40, 30, 48, 40]])
    assert sorted(ds.coco.anns) == [1, 10]  # evaluation sees what was validated: the NaN box (9) is gone ...
    assert ds.coco.anns[10]["bbox"] == [40, 30, 8, 10] and ds.coco.anns[10]["area"] == 80  # ... box 10 clipped


def test_on_error_value_is_checked(tmp_path):
    ann, img_dir = make_dataset(tmp_path, n=1)
    with pytest.raises(ConfigError, match="data.on_error='ignore' must be one of"):
        CocoDetection(ann, img_dir, on_error="ignore")


def test_corrupt_image_raises_naming_the_file(tmp_path):
    ann, img_dir = make_dataset(tmp_path, bad={"a2.png"})
    ds = build_dataset(data_cfg(ann, img_dir), "val", train=False)  # built fine: the file exists
    loader = build_loader(ds, 2, False, 0, 32, 0, False)
    with pytest.raises(ImageReadError, match=r"cannot read image .*a2.png.*truncated"):
        list(loader)


@pytest.mark.parametrize("workers", [0, 1])
def test_eval_skips_corrupt_images_and_reports_each_pass(tmp_path, caplog, workers):
    ann, img_dir = make_dataset(tmp_path, bad={"a2.png", "a5.png"})
    ds = build_dataset(data_cfg(ann, img_dir, "skip"), "val", train=False)
    loader = build_loader(ds, 2, False, workers, 32, 0, False)
    for epoch in (1, 2):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            batches = list(loader)
        ids = [i for b in batches for i in b.image_ids.tolist()]
        assert ids == [100, 101, 103, 104]  # dropped, not replaced: no image evaluated twice
        assert [len(b) for b in batches] == [2, 1, 1]
        report = [r.getMessage() for r in caplog.records if "in this pass" in r.getMessage()]
        assert len(report) == 1 and "2 of 6 images" in report[0], report
        assert "a2.png (unreadable)" in report[0] and "a5.png (unreadable)" in report[0]
        assert ds.load_skipped == 2 * epoch


def test_train_replaces_corrupt_images_with_the_next_readable_one(tmp_path, caplog):
    ann, img_dir = make_dataset(tmp_path, bad={"a1.png"})
    ds = build_dataset(data_cfg(ann, img_dir, "skip"), "train", train=True)
    loader = build_loader(ds, 3, True, 0, 32, 0, False)
    with caplog.at_level(logging.WARNING):
        batches = list(loader)
    assert [len(b) for b in batches] == [3, 3]  # full batches
    ids = [i for b in batches for i in b.image_ids.tolist()]
    assert 101 not in ids and ids.count(102) == 2  # a1 replaced by a2
    assert ds.load_skipped == 1 and "a1.png (unreadable)" in caplog.text


def test_batches_of_only_skipped_images_are_empty_and_ignored(tmp_path):
    ann, img_dir = make_dataset(tmp_path, n=3, bad={"a0.png", "a1.png"})
    ds = build_dataset(data_cfg(ann, img_dir, "skip"), "val", train=False)
    batches = list(build_loader(ds, 2, False, 0, 32, 0, False))
    assert [len(b) for b in batches] == [0, 1]
    assert batches[0].images.shape == (0, 3, 32, 32) and batches[0].gt_labels.shape == (0, 1)

    calls = []

    class FakeDetector:
        model = torch.nn.Identity()

        def detect_batch(self, batch, criterion=None):
            calls.append(len(batch))
            return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                     "labels": torch.zeros(0, dtype=torch.int64)} for _ in range(len(batch))], None

    dets, ids, _ = Detector.detect(FakeDetector(), batches, progress=False)
    assert calls == [1] and ids == [102] and dets[0]["orig_size"] == (40, 48)


def test_an_image_the_evaluation_could_not_read_counts_as_missed(tmp_path):
    ann, img_dir = make_dataset(tmp_path, bad={"a2.png"})
    ds = build_dataset(data_cfg(ann, img_dir, "skip"), "val", train=False)
    read = [i for i in ds.image_ids if i != 102]  # a2.png (id 102) was skipped when loaded
    dets = ground_truth_as_detections(ds.coco, ds.cat_id_to_label, read)
    metrics = coco_evaluate(ds.coco, to_coco_results(dets, read, ds.label_to_cat_id), ds.image_ids)
    assert metrics["stats"]["AR100"] == pytest.approx(5 / 6)  # its object is missed, not forgotten


def test_dropped_boxes_are_not_ground_truth_for_the_evaluation(tmp_path):
    anns = [{"id": i + 1, "image_id": 100 + i, "category_id": 3, "bbox": [4, 4, 20, 16]} for i in range(3)]
    anns += [{"id": 10, "image_id": 100, "category_id": 3, "bbox": [30, 20, -5, 30]},  # negative width: dropped
             {"id": 11, "image_id": 101, "category_id": 8, "bbox": [2, 2, float("nan"), 9]}]  # NaN: dropped
    ann, img_dir = make_dataset(tmp_path, n=3, annotations=anns)
    ds = CocoDetection(ann, img_dir)
    assert sorted(ds.coco.anns) == [1, 2, 3] and ds.box_counts["dropped"] == 2
    dets = ground_truth_as_detections(ds.coco, ds.cat_id_to_label, ds.image_ids)  # a perfect detector
    metrics = coco_evaluate(ds.coco, to_coco_results(dets, ds.image_ids, ds.label_to_cat_id))
    assert metrics["stats"]["AP"] == pytest.approx(1.0) and metrics["stats"]["AR100"] == pytest.approx(1.0)
    assert metrics["per_class"][8] is None  # class 8's only box was dropped: nothing to measure, not a fake 0


def test_an_unreadable_image_in_a_loader_worker_is_one_line(tmp_path):
    ann, img_dir = make_dataset(tmp_path, bad={"a2.png"})
    ds = build_dataset(data_cfg(ann, img_dir), "val", train=False)
    with pytest.raises(ImageReadError) as err:
        list(build_loader(ds, 2, False, 1, 32, 0, False))  # one worker process: torch re-raises its traceback
    assert "Caught ImageReadError in DataLoader worker" in str(err.value)
    message = user_message(err.value)
    assert message.startswith("cannot read image ") and "a2.png" in message and "\n" not in message


@pytest.mark.slow
def test_training_reports_an_unreadable_image_as_one_line_with_exit_code_2(tmp_path):
    ann, img_dir = make_dataset(tmp_path, bad={"a2.png"})
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "experiment=own_data",
                           f"data.train_ann={ann}", f"data.train_images={img_dir}", f"data.val_ann={ann}",
                           f"data.val_images={img_dir}", "data.min_size=32", "data.max_size=48", "trainer.epochs=1",
                           "trainer.time_limit=null", "trainer.batch_size=2", "trainer.num_workers=1",
                           "trainer.progress=false", "data.verify=false", f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-3000:]
    assert "cannot read image" in text and "a2.png" in text
    assert "Traceback" not in text and "Caught ImageReadError" not in text


def test_all_images_unreadable_is_an_error(tmp_path):
    ann, img_dir = make_dataset(tmp_path, n=2, bad={"a0.png", "a1.png"})
    ds = build_dataset(data_cfg(ann, img_dir, "skip"), "train", train=True)
    with pytest.raises(DatasetError, match="none of the 2 images .* can be read"):
        ds[0]


def test_crowd_boxes_reach_the_loss_as_ignore_regions(tmp_path):
    """Dataset -> eval transform -> collate -> RetinaNetLoss: anchors mostly inside the crowd box get no
    loss and no gradient, every other anchor is a negative, and the crowd box is never a positive."""
    anns = [{"id": 1, "image_id": 100, "category_id": 8, "bbox": [9, 7, 40, 26], "iscrowd": 1}]
    ann, img_dir = make_dataset(tmp_path, n=1, size=(64, 48), annotations=anns)
    cfg = data_cfg(ann, img_dir)
    cfg.min_size, cfg.max_size = 48, 64  # no resize: boxes stay in file pixels
    ds = build_dataset(cfg, "val", train=False)
    batch = SkippingCollate(32)([ds[0]])
    assert batch.gt_crowd.tolist() == [[True]] and batch.gt_labels.tolist() == [[1]]

    gen = AnchorGenerator(sizes=(8, 16), strides=(8, 16), offset=0.5)
    anchors = gen([(8, 8), (4, 4)], (64, 64))  # [A, 4]
    logits = torch.randn(1, len(anchors), 2, generator=torch.Generator().manual_seed(0), requires_grad=True)
    loss_fn = RetinaNetLoss(num_classes=2, matcher=Matcher(crowd_ioa=0.5))
    out = loss_fn(logits, torch.zeros(1, len(anchors), 4), anchors, batch.gt_boxes, batch.gt_labels, batch.gt_crowd)
    out["loss"].backward()

    a = anchors.double().numpy()  # expected ignore set: intersection / anchor area >= 0.5, by hand
    iw = (np.minimum(a[:, 2], 49) - np.maximum(a[:, 0], 9)).clip(0)
    ih = (np.minimum(a[:, 3], 33) - np.maximum(a[:, 1], 7)).clip(0)
    ioa = iw * ih / ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]))
    assert not np.isclose(ioa, 0.5, atol=1e-4).any()  # no anchor on the threshold (float32 vs float64)
    ignored = torch.from_numpy(ioa >= 0.5)
    assert 0 < int(ignored.sum()) < len(anchors)
    matched = loss_fn.matcher(anchors, batch.gt_boxes, batch.gt_labels >= 0, batch.gt_crowd)[0]
    assert torch.equal(matched == IGNORE, ignored) and not (matched >= 0).any()
    assert float(out["num_pos"]) == 0 and float(out["loss_box"]) == 0
    per_elem = sigmoid_focal_loss(logits.detach()[0], torch.zeros(len(anchors), 2), alpha=0.25, gamma=2.0,
                                  reduction="none")
    assert float(out["loss_cls"].detach()) == pytest.approx(float(per_elem[~ignored].sum()), rel=1e-5)
    grad = logits.grad[0].abs().sum(dim=1)
    assert (grad[ignored] == 0).all() and (grad[~ignored] > 0).all()

    batch.gt_crowd[:] = False  # the same box as an object: it becomes a positive target
    assert float(loss_fn(logits.detach(), torch.zeros(1, len(anchors), 4), anchors, batch.gt_boxes, batch.gt_labels,
                         batch.gt_crowd)["num_pos"]) > 0


@pytest.mark.slow
def test_a_run_whose_boxes_the_loader_dropped_trains_evaluates_draws_and_saves(tmp_path):
    # the dropped boxes once crashed the end-of-training pictures (PIL: x1 < x0; int(NaN)) before best.pt
    from retinanet.trainer import run

    from conftest import compose_train

    anns = [{"id": i + 1, "image_id": 100 + i, "category_id": 3 if i % 2 else 8, "bbox": [4, 4, 20, 16]}
            for i in range(6)]
    anns += [{"id": 10, "image_id": 100, "category_id": 3, "bbox": [30, 20, -5, 30]},
             {"id": 11, "image_id": 101, "category_id": 8, "bbox": [2, 2, float("nan"), 9]}]
    ann, img_dir = make_dataset(tmp_path, annotations=anns)
    paths = [f"data.{split}_{kind}={path}" for split in ("train", "val")
             for kind, path in (("ann", ann), ("images", img_dir))]
    out = tmp_path / "run"
    run(compose_train(["experiment=own_data", *paths, "data.min_size=32", "data.max_size=48", "trainer.epochs=1",
                       "trainer.time_limit=null", "trainer.batch_size=2", "trainer.num_workers=0",
                       "trainer.progress=false", "trainer.eval_every=0", "model.net.fpn_channels=16",
                       "model.net.head_width=16", "model.net.head_depth=1", "postprocess.score_thresh=0.0"]), out)
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file()
    assert json.loads((out / "metrics.json").read_text())["final"]["images"] == 6


def test_a_missing_val_file_counts_as_missed_like_an_undecodable_one(tmp_path):
    ann, img_dir = make_dataset(tmp_path, bad={"a2.png"})
    (img_dir / "a4.png").unlink()
    ds = build_dataset(data_cfg(ann, img_dir, "skip"), "val", train=False)
    assert len(ds) == 6 and 104 in ds.coco.imgs and ds.coco.getAnnIds(imgIds=[104])  # kept in the ground truth
    batches = list(build_loader(ds, 2, False, 0, 32, 0, False))
    read = [i for b in batches for i in b.image_ids.tolist()]
    assert sorted(read) == [100, 101, 103, 105]  # both skipped when loaded
    dets = ground_truth_as_detections(ds.coco, ds.cat_id_to_label, read)  # a perfect detector on what it saw
    metrics = coco_evaluate(ds.coco, to_coco_results(dets, read, ds.label_to_cat_id), ds.image_ids)
    assert metrics["stats"]["AR100"] == pytest.approx(4 / 6)  # both objects missed, neither forgotten
    train = build_dataset(data_cfg(ann, img_dir, "skip"), "train", train=True)
    assert len(train) == 5  # training leaves the missing file out
