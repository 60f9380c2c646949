"""TensorBoard views: drawn val images, PR curves, per-class AP, score histogram and hparams are
written by retinanet.report.tensorboard and read back with TensorBoard's own event reader."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from pycocotools.cocoeval import COCOeval
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
from tensorboard.util import tensor_util
from torch.utils.tensorboard import SummaryWriter

from retinanet.data.build import build_dataset, build_loader
from retinanet.detector import Detector
from retinanet.evaluation import coco_evaluate, evaluate, ground_truth_as_detections, to_coco_results
from retinanet.report.tensorboard import (
    GT_COLOR,
    PRED_COLOR,
    draw_eval_image,
    hparams_of,
    log_eval_visuals,
    log_hparams,
    pr_curve_arrays,
)

from conftest import compose_train, tiny_train_overrides


def coco_precision(coco_gt, results, image_ids) -> np.ndarray:
    """COCOeval.eval["precision"] [T, R, K, A, M], as the trainer gets it from coco_evaluate."""
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
        ev.params.imgIds = sorted(int(i) for i in image_ids)
        ev.evaluate()
        ev.accumulate()
    return ev.eval["precision"]


def read_events(logdir) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"images": 0, "tensors": 0, "scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def colour_pixels(image: np.ndarray, rgb) -> int:
    return int((np.abs(image.astype(int) - np.array(rgb)).sum(axis=2) < 30).sum())


@pytest.fixture(scope="module")
def tiny_eval(tiny_shapes):
    """An untrained tiny model's detections on the tiny val split (score threshold lowered so there are some)."""
    cfg = compose_train(tiny_train_overrides(tiny_shapes, 1) + ["postprocess.score_thresh=0.001", "loss.gamma=1.5"])
    val_set = build_dataset(cfg.data, "val", train=False)
    loader = build_loader(val_set, 16, False, 0, cfg.data.size_divisible, 0, False)
    torch.manual_seed(0)
    label_map = {"class_names": val_set.class_names, "category_ids": val_set.label_to_cat_id}
    detector = Detector.from_config(cfg, label_map, "cpu")
    result = evaluate(detector, loader, val_set, instantiate(cfg.loss, num_classes=val_set.num_classes),
                      progress=False)
    results = to_coco_results(result.detections, result.image_ids, val_set.label_to_cat_id)
    assert np.array_equal(result.precision, coco_precision(val_set.coco, results, result.image_ids))
    return cfg, val_set, result.detections, result.image_ids, result.metrics, result.precision


def test_eval_visuals_and_hparams_are_in_the_event_file(tiny_eval, tmp_path):
    cfg, val_set, detections, image_ids, metrics, precision = tiny_eval
    assert sum(len(d["scores"]) for d in detections) > 0
    writer = SummaryWriter(str(tmp_path))
    log_eval_visuals(writer, 7, val_set, detections, image_ids, metrics, precision, num_images=3, min_score=0.0)
    hp = log_hparams(writer, cfg, metrics, step=7)
    writer.close()
    acc = read_events(tmp_path)
    tags = acc.Tags()

    # images: three, side by side (ground truth green | predictions red), enlarged from the small originals
    image_tags = sorted(t for t in tags["images"] if t.startswith("val_images/"))
    assert len(image_tags) == 3 and image_tags[0] == f"val_images/0_id{image_ids[0]}"
    event = acc.Images(image_tags[0])[0]
    assert event.step == 7
    drawn = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    info = val_set.coco.imgs[image_ids[0]]
    h, w = info["height"], info["width"]
    assert drawn.shape[0] >= 320 > max(h, w) and drawn.shape[1] > 2 * drawn.shape[0] * min(w, h) / max(w, h) - 1
    half = drawn.shape[1] // 2
    assert colour_pixels(drawn[:, :half], GT_COLOR) > 50 and colour_pixels(drawn[:, :half], PRED_COLOR) < 5
    assert colour_pixels(drawn[:, half:], PRED_COLOR) > 50 and colour_pixels(drawn[:, half:], GT_COLOR) < 5

    # PR curves: one per class with ground truth, [6, N] arrays with precision and recall in [0, 1]
    pr_tags = acc.PluginTagToContent("pr_curves")
    classes_with_gt = {name for name, n in zip(val_set.class_names, val_set.class_counts()) if n}
    assert {t.split("/", 1)[1] for t in pr_tags} == classes_with_gt
    for tag in pr_tags:
        data = tensor_util.make_ndarray(acc.Tensors(tag)[0].tensor_proto)
        assert data.shape[0] == 6 and data.shape[1] >= 1
        assert ((0 <= data[4]) & (data[4] <= 1)).all() and ((0 <= data[5]) & (data[5] <= 1)).all()

    # per-class AP, score histogram, detections per image
    for cat, name in zip(val_set.label_to_cat_id, val_set.class_names):
        if name in classes_with_gt:
            assert acc.Scalars(f"val_ap/{name}")[0].value == pytest.approx(metrics["per_class"][cat], abs=1e-6)
    hist = acc.Histograms("val/score_hist")[0].histogram_value
    n_dets = sum(len(d["scores"]) for d in detections)
    assert hist.num == n_dets and 0 < hist.min <= hist.max <= 1
    assert acc.Scalars("val/detections_per_image")[0].value == pytest.approx(n_dets / len(detections))

    # hparams: the session start info holds the config values, the metrics are scalars of the same run
    hp_content = acc.PluginTagToContent("hparams")
    assert set(hp_content) == {"_hparams_/session_start_info", "_hparams_/session_end_info"}  # TB builds the table
    start = plugin_data_pb2.HParamsPluginData.FromString(hp_content["_hparams_/session_start_info"])
    values = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
              for k, v in start.session_start_info.hparams.items()}
    assert values["loss.gamma"] == 1.5 and values["loss.alpha"] == cfg.loss.alpha and values["model.name"] == "retinanet_r18_cpu"
    assert values.keys() == hp.keys() and all(values[k] == pytest.approx(v) for k, v in hp.items())
    end = plugin_data_pb2.HParamsPluginData.FromString(hp_content["_hparams_/session_end_info"])
    assert end.session_end_info.status == api_pb2.Status.Value("STATUS_SUCCESS")
    assert acc.Scalars("hparam/AP")[0].value == pytest.approx(metrics["stats"]["AP"])
    assert acc.Scalars("hparam/val_loss")[0].value == pytest.approx(metrics["loss"]["loss"], rel=1e-5)
    json.dumps(hp)  # plain values only


def test_pr_curve_of_ground_truth_fed_back_is_perfect(tiny_eval, tmp_path):
    _, val_set, _, image_ids, _, _ = tiny_eval
    dets = ground_truth_as_detections(val_set.coco, val_set.cat_id_to_label, image_ids)
    results = to_coco_results(dets, image_ids, val_set.label_to_cat_id)
    metrics = coco_evaluate(val_set.coco, results, image_ids)
    writer = SummaryWriter(str(tmp_path))
    log_eval_visuals(writer, 1, val_set, dets, image_ids, metrics, coco_precision(val_set.coco, results, image_ids),
                     num_images=1)
    writer.close()
    acc = read_events(tmp_path)
    tags = acc.PluginTagToContent("pr_curves")
    assert tags
    for tag in tags:
        tp, fp, tn, fn, p, r = tensor_util.make_ndarray(acc.Tensors(tag)[0].tensor_proto)
        assert (p == 1).all() and r.max() == 1 and r.min() == 0 and (fp == 0).all()
        assert tp[0] == pytest.approx(tp[0] + fn[0]) and fn[-1] == pytest.approx(tp[0])  # all gt found at recall 1


def test_pr_curve_arrays_cut_the_unreached_tail_and_skip_classes_without_gt():
    p = np.array([1.0, 1.0, 0.5, 0.5, 0.0, 0.0])  # 6 recall thresholds 0, .2, .4, .6, .8, 1: recall .6 reached
    arrays = pr_curve_arrays(p, num_gt=10)
    assert arrays["recall"].tolist() == pytest.approx([0.6, 0.4, 0.2, 0.0])
    assert arrays["precision"].tolist() == [0.5, 0.5, 1.0, 1.0]
    assert arrays["true_positive_counts"].tolist() == pytest.approx([6, 4, 2, 0])
    assert arrays["false_positive_counts"].tolist() == pytest.approx([6, 4, 0, 0])
    assert arrays["false_negative_counts"].tolist() == pytest.approx([4, 6, 8, 10])
    assert pr_curve_arrays(np.full(101, -1.0), num_gt=0) is None


def test_drawing_puts_ground_truth_left_and_confident_predictions_right():
    image = np.full((100, 200, 3), 128, dtype=np.uint8)
    det = {"boxes": torch.tensor([[120.0, 10.0, 190.0, 90.0], [5.0, 5.0, 50.0, 50.0]]),
           "scores": torch.tensor([0.9, 0.1]), "labels": torch.tensor([1, 0])}
    drawn = draw_eval_image(image, [[10, 10, 60, 60]], [0], det, ["a", "b"], min_score=0.3)
    assert drawn.shape == (160, 2 * 320 + 4, 3)  # enlarged x1.6 to 320 px, two panels and a gap
    left, right = drawn[:, :320], drawn[:, 324:]
    assert colour_pixels(left, GT_COLOR) > 100 and colour_pixels(left, PRED_COLOR) == 0
    red = np.argwhere((np.abs(right.astype(int) - np.array(PRED_COLOR)).sum(axis=2) < 30))
    assert red[:, 1].min() >= int(120 * 1.6) - 2  # only the 0.9 box (x from 120), not the 0.1 one (x from 5)


def test_hparams_include_command_line_overrides_inside_a_hydra_job():
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from conftest import CONFIGS

    overrides = ["loss.gamma=3", "loss.alpha=null", "model=retinanet_r50", "trainer.grad_clip=1.5", "+sweep=demo"]
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        hp = hparams_of(cfg)
    finally:
        HydraConfig.instance().cfg = None
    assert hp["loss.gamma"] == 3 and hp["loss.alpha"] == "null" and hp["trainer.grad_clip"] == 1.5
    assert hp["model"] == "retinanet_r50" and hp["model.name"] == "retinanet_r50" and hp["sweep"] == "demo"
    assert hp["trainer.epochs"] == 5 and hp["optim.lr"] == cfg.optim.lr  # from the config, not overridden
    assert hp["schedule.warmup"] == cfg.schedule.warmup and hp["loss._target_"] == "RetinaNetLoss"  # whole groups
    assert not any(k.startswith("hydra") for k in hp)


@pytest.mark.slow
def test_training_run_logs_visuals_pr_curves_and_hparams(tiny_shapes, tmp_path):
    """End to end: a short training run's own event file holds what the detector does at each evaluation."""
    from retinanet.trainer import run

    out = tmp_path / "run"
    ap = run(compose_train(tiny_train_overrides(tiny_shapes, 2) + [
        "trainer.eval_every=1", "postprocess.score_thresh=0.001", "loss.gamma=1.5", "trainer.threads=1"]), out)
    history = json.loads((out / "metrics.json").read_text())["history"]
    steps = [e["step"] for e in history]
    assert len(steps) == 2 and "precision" not in history[-1]["val"]  # the numpy array never reaches the JSON
    acc = read_events(out / "tensorboard")
    tags = acc.Tags()

    image_tags = [t for t in tags["images"] if t.startswith("val_images/")]
    assert len(image_tags) == 4
    assert [e.step for e in acc.Images(image_tags[0])] == steps  # drawn at every evaluation
    pr_tags = acc.PluginTagToContent("pr_curves")
    assert pr_tags and all(t.startswith("val_pr_iou50/") for t in pr_tags)
    assert [e.step for e in acc.Tensors(next(iter(pr_tags)))] == steps
    ap_tags = [t for t in tags["scalars"] if t.startswith("val_ap/")]
    assert ap_tags and [e.step for e in acc.Scalars(ap_tags[0])] == steps
    assert acc.Histograms("val/score_hist")[-1].step == steps[-1]
    for tag in ("train/num_pos_per_image", "train/grad_norm"):
        values = [e.value for e in acc.Scalars(tag)]
        assert values and all(np.isfinite(values)) and max(values) > 0

    hp_content = acc.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in hp_content
    start = plugin_data_pb2.HParamsPluginData.FromString(hp_content["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["loss.gamma"].number_value == 1.5
    assert acc.Scalars("hparam/AP")[-1].value == pytest.approx(ap)
    assert acc.Scalars("hparam/AP")[-1].step == steps[-1]
