"""The PNG pictures of a run (retinanet.report.plots): the files a
training run and scripts/evaluate.py write (valid PNGs of sensible size), counts that add up to the data, and
the per-step curves that are TensorBoard's values and survive a checkpoint."""

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from retinanet.checkpoint import load_checkpoint
from retinanet.data.build import build_dataset, build_loader
from retinanet.detector import Detector
from retinanet.evaluation import dataset_confusion, evaluate
from retinanet.report.plots import plot_ap_history, plot_loss_lr, write_run_plots

from conftest import compose_cfg, compose_train, eval_overrides, load_script, tiny_train_overrides

RUN_PICTURES = ("loss_lr.png", "ap_history.png", "pr_curves_iou50.png", "confusion_matrix.png", "val_images.png")


def test_curves_without_steps_and_history_without_evaluations(tmp_path):
    history = [{"epoch": 1, "step": 5, "train": {"loss": 1.0, "loss_cls": 0.6, "loss_box": 0.4}}]
    assert plot_ap_history(history, tmp_path / "ap.png") is None  # no evaluated epoch: no picture
    path = plot_loss_lr({}, history, tmp_path / "loss.png")  # nothing logged per step: epoch means only
    assert Image.open(path).size == (900, 600)
    written = write_run_plots(tmp_path / "plots", history, {})  # no evaluation: the training pictures only
    assert [p.name for p in written] == ["loss_lr.png"]


def open_png(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        pixels = np.asarray(im.convert("RGB"))
    h, w = pixels.shape[:2]
    assert 300 <= w <= 3000 and 300 <= h <= 3000, (path.name, w, h)
    assert pixels.std() > 5  # something is drawn
    return pixels


def test_a_training_run_writes_its_pictures(tiny_run):
    run_dir = tiny_run.checkpoint.parent
    for name in RUN_PICTURES:
        open_png(run_dir / "plots" / name)
    cfg = compose_train(tiny_train_overrides(tiny_run.root, 1) + ["data.generate=null"])
    val = build_dataset(cfg.data, "val", train=False)
    confusion = json.loads((run_dir / "plots" / "confusion_matrix.json").read_text())
    matrix = np.array(confusion["matrix"])
    assert confusion["classes"] == val.class_names and matrix.shape == (val.num_classes + 1,) * 2
    assert matrix[:-1].sum(axis=1).tolist() == val.class_counts().tolist()  # every ground-truth box counted once
    assert confusion["score_thresh"] == 0.3 and confusion["iou_thresh"] == 0.5


def test_the_curves_are_tensorboards_values_and_are_checkpointed(tiny_run):
    run_dir = tiny_run.checkpoint.parent
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    curves = load_checkpoint(tiny_run.checkpoint)["curves"]
    for term in ("loss", "loss_cls", "loss_box", "lr"):
        logged = [(e.step, e.value) for e in acc.Scalars(f"train/{term}")]
        assert len(logged) == 2  # two steps, trainer.log_every=1
        assert curves[term].shape == (2, 2)
        assert curves[term][:, 0].tolist() == [s for s, _ in logged]
        assert curves[term][:, 1].tolist() == pytest.approx([v for _, v in logged], rel=1e-6)  # TB keeps float32


@pytest.fixture(scope="module")
def evaluated(tiny_run, tmp_path_factory):
    """scripts/evaluate.py on the tiny run, every detection in the pictures (score threshold 0)."""
    out = tmp_path_factory.mktemp("evaluate_plots")
    overrides = eval_overrides(tiny_run.checkpoint, tiny_run.root, "batch_size=8", "evaluation.plots.score_thresh=0",
                               "evaluation.plots.num_images=3")
    cfg = compose_cfg("evaluate", overrides)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        load_script("evaluate").run(cfg, out, {"score_thresh": 0.001})
    return cfg, out, printed.getvalue()


def test_evaluate_writes_the_evaluation_pictures_and_counts_add_up(tiny_run, evaluated):
    cfg, out, printed = evaluated
    for name in ("pr_curves_iou50.png", "confusion_matrix.png", "val_images.png"):
        open_png(out / "plots" / name)
    assert not (out / "plots" / "loss_lr.png").exists()  # the run's pictures belong to the run
    assert "pictures: " in printed and "confusion_matrix.png" in printed
    # the same detections in process: the matrix counts every confident detection and every box once
    detector = Detector.from_checkpoint(tiny_run.checkpoint, "cpu", postprocess={"score_thresh": 0.001})
    val = build_dataset(cfg.data, "val", train=False, resize=(detector.min_size, detector.max_size))
    result = evaluate(detector, build_loader(val, 8, False, 0, detector.size_divisible, 0, False), val, progress=False)
    matrix, ignored = dataset_confusion(val, result.detections, result.image_ids, score_thresh=0.0)
    n_dets = sum(len(d["scores"]) for d in result.detections)
    assert n_dets > 0 and matrix[:, :-1].sum() + ignored == n_dets
    assert matrix[:-1].sum(axis=1).tolist() == val.class_counts().tolist()
    written = json.loads((out / "plots" / "confusion_matrix.json").read_text())
    assert written["matrix"] == matrix.tolist() and written["score_thresh"] == 0


def test_pictures_can_be_turned_off(tiny_run, tmp_path):
    overrides = eval_overrides(tiny_run.checkpoint, tiny_run.root, "batch_size=8", "evaluation.plots.enabled=false")
    with contextlib.redirect_stdout(io.StringIO()):
        load_script("evaluate").run(compose_cfg("evaluate", overrides), tmp_path)
    assert (tmp_path / "metrics.json").is_file() and not (tmp_path / "plots").exists()
