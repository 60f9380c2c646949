"""COCO evaluation: ground truth fed back gives AP 1.0; results use the dataset's category ids."""

import json

import pytest
import torch
from pycocotools.coco import COCO

from retinanet.evaluation import STAT_NAMES, coco_evaluate, format_metrics, ground_truth_as_detections, to_coco_results


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
