"""The PNG pictures of a run (retinanet.report.plots): the confusion-matrix counting on hand-made boxes, the files a
training run and scripts/evaluate.py write (valid PNGs of sensible size), counts that add up to the data, and
the per-step curves that are TensorBoard's values and survive a checkpoint."""

import contextlib
import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from retinanet.checkpoint import load_checkpoint
from retinanet.data.build import build_dataset, build_loader
from retinanet.detector import Detector
from retinanet.evaluation import evaluate
from retinanet.report.plots import (
    confusion_matrix,
    dataset_confusion,
    dataset_labels,
    plot_ap_history,
    plot_loss_lr,
    write_run_plots,
)

from conftest import compose_train, tiny_train_overrides
from test_evaluate_infer import compose_cfg, eval_overrides, load_script

RUN_PICTURES = ("loss_lr.png", "ap_history.png", "pr_curves_iou50.png", "confusion_matrix.png", "val_images.png")


def dets(*rows):
    """Detections from rows (x1, y1, x2, y2, score, label)."""
    t = torch.tensor(rows, dtype=torch.float64).reshape(-1, 6)
    return {"boxes": t[:, :4], "scores": t[:, 4].float(), "labels": t[:, 5].long()}


def gts(*rows, crowd=None):
    """Ground truth from rows (x1, y1, x2, y2, label)."""
    a = np.asarray(rows, dtype=np.float64).reshape(-1, 5)
    return {"boxes": a[:, :4], "labels": a[:, 4].astype(np.int64),
            "crowd": np.zeros(len(a), bool) if crowd is None else np.asarray(crowd)}


def check_sums(matrix, ignored, detections, ground_truths, k, thresh):
    """The two invariants of the docstring: gt rows = boxes per class; predicted columns = confident detections."""
    per_class = np.zeros(k, dtype=np.int64)
    for g in ground_truths:
        np.add.at(per_class, g["labels"][~g["crowd"]], 1)
    assert matrix[:k].sum(axis=1).tolist() == per_class.tolist()  # detection columns + missed = gt of the class
    confident = sum(int((d["scores"] >= thresh).sum()) for d in detections)
    assert matrix[:, :k].sum() + ignored == confident
    assert matrix[k, k] == 0


def test_confusion_matrix_on_hand_made_boxes():
    A, B, BG = 0, 1, 2
    ground_truths = [
        gts((0, 0, 10, 10, A), (20, 0, 30, 10, B), (40, 0, 50, 10, A), (60, 0, 70, 10, B)),
        gts((0, 0, 10, 10, B)),   # image 2: the only detection is below the threshold -> missed
        gts(),                    # image 3: no object, one confident detection -> false positive
    ]
    detections = [
        dets((0, 0, 10, 10, 0.9, A),      # right: A -> A
             (21, 0, 31, 10, 0.8, A),     # the B box taken for an A (IoU 0.82): B -> A
             (0, 1, 10, 11, 0.7, A),      # a second detection of the first box: already taken -> false positive A
             (80, 80, 90, 90, 0.6, B),    # nothing there: false positive B
             (40, 0, 50, 10, 0.2, A)),    # below 0.3: left out, so the second A box is missed
        dets((0, 0, 10, 10, 0.29, B)),
        dets((0, 0, 5, 5, 0.5, A)),
    ]
    matrix, ignored = confusion_matrix(detections, ground_truths, num_classes=2, score_thresh=0.3, iou_thresh=0.5)
    expected = np.zeros((3, 3), dtype=np.int64)
    expected[A, A] = 1
    expected[B, A] = 1
    expected[BG, A] = 2   # the repeat and the empty image's detection
    expected[BG, B] = 1
    expected[A, BG] = 1   # the unseen third box (A)
    expected[B, BG] = 2   # the fourth box of image 1 and image 2's box
    assert matrix.tolist() == expected.tolist() and ignored == 0
    check_sums(matrix, ignored, detections, ground_truths, 2, 0.3)


def test_greedy_by_score_own_class_first_and_crowd_regions_ignored():
    A, B = 0, 1
    # two detections of one A box: the better score (A, IoU 0.83) takes it, not the better IoU (B, IoU 1)
    m, _ = confusion_matrix([dets((0, 0, 10, 10, 0.6, B), (0, 0, 10, 12, 0.9, A))], [gts((0, 0, 10, 10, A))], 2)
    assert m[A, A] == 1 and m[2, B] == 1 and m[A, B] == 0 and m[A, 2] == 0
    # an A detection over an A box (IoU 0.67) and a B box (IoU 1): its own class wins
    ground = gts((0, 0, 10, 10, A), (2, 0, 12, 10, B))
    m, _ = confusion_matrix([dets((2, 0, 12, 10, 0.9, A))], [ground], 2)
    assert m[A, A] == 1 and m[B, A] == 0 and m[B, 2] == 1
    # a detection inside a crowd region is neither right nor wrong; crowd boxes are never "missed"
    ground = gts((0, 0, 10, 10, A), (50, 50, 100, 100, B), crowd=[False, True])
    detections = [dets((0, 0, 10, 10, 0.9, A), (60, 60, 70, 70, 0.8, B), (200, 200, 210, 210, 0.7, B))]
    m, ignored = confusion_matrix(detections, [ground], 2)
    assert ignored == 1 and m[A, A] == 1 and m[2, B] == 1 and m[B].sum() == 0
    check_sums(m, ignored, detections, [ground], 2, 0.3)
    # no detections, no ground truth
    m, ignored = confusion_matrix([dets()], [gts()], 3)
    assert m.shape == (4, 4) and m.sum() == 0 and ignored == 0


def test_relabelling_to_the_dataset_label_space():
    dataset = SimpleNamespace(cat_id_to_label={10: 0, 20: 1, 30: 2})
    out = dataset_labels([dets((0, 0, 1, 1, 0.5, 0), (0, 0, 1, 1, 0.5, 2))], [30, 10, 20], dataset)
    assert out[0]["labels"].tolist() == [2, 1]  # label 0 = category 30 = dataset label 2


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
