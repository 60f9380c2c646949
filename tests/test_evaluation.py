"""COCO evaluation: ground truth fed back gives AP 1.0; results use the dataset's category ids; the confusion-matrix
counting on hand-made boxes."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from retinanet.evaluation import (
    STAT_NAMES,
    coco_evaluate,
    confusion_matrix,
    dataset_labels,
    format_metrics,
    ground_truth_as_detections,
    judged_metrics,
    to_coco_results,
)


@pytest.fixture()
def coco_gt(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "width": 200, "height": 150} for i in (3, 7, 9)]
    boxes = {3: [(10, 10, 50, 40, 5), (100, 60, 30, 80, 11)], 7: [(20, 30, 60, 60, 5)], 9: []}
    anns, k = [], 1
    for image_id, items in boxes.items():
        for x, y, w, h, cat in items:
            anns.append({"id": k, "image_id": image_id, "category_id": cat, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0})
            k += 1
    data = {"images": images, "annotations": anns,
            "categories": [{"id": 5, "name": "cat"}, {"id": 11, "name": "dog"}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def test_ground_truth_as_detections_scores_one(coco_gt):
    ids = coco_gt.getImgIds()
    dets = ground_truth_as_detections(coco_gt, {5: 0, 11: 1}, ids)
    results = to_coco_results(dets, ids, [5, 11])
    metrics = coco_evaluate(coco_gt, results, ids)
    assert metrics["stats"]["AP"] == pytest.approx(1.0)
    assert metrics["stats"]["AP50"] == pytest.approx(1.0)
    assert metrics["per_class"] == {5: pytest.approx(1.0), 11: pytest.approx(1.0)}


def test_wrong_class_scores_zero(coco_gt):
    ids = coco_gt.getImgIds()
    dets = ground_truth_as_detections(coco_gt, {5: 1, 11: 0}, ids)  # labels swapped
    metrics = coco_evaluate(coco_gt, to_coco_results(dets, ids, [5, 11]), ids)
    assert metrics["stats"]["AP"] == 0.0


def test_results_are_xywh_with_dataset_category_ids():
    det = {"boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0]]), "scores": torch.tensor([0.9]),
           "labels": torch.tensor([1])}
    (r,) = to_coco_results([det], [42], [5, 11])
    assert r == {"image_id": 42, "category_id": 11, "bbox": [10.0, 20.0, 30.0, 40.0], "score": pytest.approx(0.9)}


def test_no_detections_gives_zeros_and_a_table(coco_gt):
    metrics = coco_evaluate(coco_gt, [], coco_gt.getImgIds())
    assert set(metrics["stats"]) == set(STAT_NAMES) and not any(metrics["stats"].values())
    text = format_metrics(metrics, {5: "cat", 11: "dog"})
    assert "maxDets=100" in text and "dog" in text and text.count("\n") >= 15


def test_results_with_class_names_are_annotations():
    """Inference's JSON: the same numbers as the evaluation's results, plus COCO's annotation fields."""
    det = {"boxes": torch.tensor([[10.0, 20.0, 40.123456, 80.5], [0.0, 0.0, 5.0, 5.0]]),
           "scores": torch.tensor([0.876543, 0.05]), "labels": torch.tensor([1, 0])}
    plain = to_coco_results([det], [7], [5, 11])
    named = to_coco_results([det], [7], [5, 11], class_names=["cat", "dog"])
    assert [{k: r[k] for k in p} for r, p in zip(named, plain)] == plain
    assert named[0] == {"image_id": 7, "category_id": 11, "bbox": [10.0, 20.0, 30.12, 60.5], "score": 0.87654,
                        "category_name": "dog", "area": round(30.123456 * 60.5, 2), "iscrowd": 0}
    assert repr(plain[1]["score"]) == "0.05"  # written as the decimal, not as float32's neighbour 0.05000000074505806


def test_judged_metrics_prefer_the_ema_weights():
    assert judged_metrics({"val": {"AP": 0.1}, "val_ema": {"AP": 0.2}}) == {"AP": 0.2}
    assert judged_metrics({"val": {"AP": 0.1}}) == {"AP": 0.1}
    assert judged_metrics({"train": {}}) is None


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
