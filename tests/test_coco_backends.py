"""evaluation.backend=faster_coco_eval gives pycocotools' numbers: the 12 COCO numbers and the per-class AP to
1e-6 (None in both where a class has no ground truth), and the same precision array (the PR curves); a clear
error when it is chosen but not installed, or misspelt."""

import sys

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from retinanet.config import validate_train_config
from retinanet.data.build import build_dataset
from retinanet.detector import Detector
from retinanet.errors import ConfigError
from retinanet.evaluation import STAT_NAMES, coco_evaluate, ground_truth_as_detections, to_coco_results

from conftest import compose_train, tiny_train_overrides


def same_numbers(coco_gt, results, image_ids=None) -> tuple[dict, dict]:
    ref = coco_evaluate(coco_gt, results, image_ids, with_precision=True)
    fast = coco_evaluate(coco_gt, results, image_ids, with_precision=True, backend="faster_coco_eval")
    assert set(ref["stats"]) == set(fast["stats"]) == set(STAT_NAMES)
    for name in STAT_NAMES:
        a, b = ref["stats"][name], fast["stats"][name]
        assert (a is None) == (b is None), name
        if a is not None:
            assert b == pytest.approx(a, abs=1e-6), name
    assert ref["per_class"].keys() == fast["per_class"].keys()
    for cat, a in ref["per_class"].items():
        b = fast["per_class"][cat]
        assert (a is None) == (b is None), cat
        if a is not None:
            assert b == pytest.approx(a, abs=1e-6), cat
    assert ref["precision"].shape == fast["precision"].shape
    np.testing.assert_allclose(fast["precision"], ref["precision"], atol=1e-6)
    return ref, fast


@pytest.fixture(scope="module")
def tiny_detections(tiny_run):
    """The tiny run's checkpoint on its val split (low score threshold: many detections): (val set, COCO results)."""
    cfg = compose_train(tiny_train_overrides(tiny_run.root, 1) + ["data.generate=null"])
    val = build_dataset(cfg.data, "val", train=False)
    detector = Detector.from_checkpoint(tiny_run.checkpoint, "cpu", postprocess={"score_thresh": 0.001})
    with torch.inference_mode():
        dets = detector.predict([val.load_image(i) for i in range(len(val))])
    results = to_coco_results(dets, val.image_ids, val.label_to_cat_id)
    return val, results


def test_same_numbers_on_the_tiny_runs_detections(tiny_detections):
    val, results = tiny_detections
    assert len(results) > 100
    ref, _ = same_numbers(val.coco, results, val.image_ids)
    assert ref["stats"]["AR100"] > 0  # the untrained model finds something: not a comparison of zeros


def test_same_numbers_on_jittered_ground_truth(tiny_detections):
    """Ground truth moved by a few pixels, random scores, some boxes relabelled: AP in the middle of its range."""
    val, _ = tiny_detections
    rng = np.random.default_rng(0)
    dets = ground_truth_as_detections(val.coco, val.cat_id_to_label, val.image_ids)
    for d in dets:
        n = len(d["scores"])
        d["boxes"] = d["boxes"] + torch.from_numpy(rng.normal(0, 3, (n, 4)))
        d["scores"] = torch.from_numpy(rng.random(n)).float()
        flip = torch.from_numpy(rng.random(n) < 0.2)
        d["labels"] = torch.where(flip, (d["labels"] + 1) % val.num_classes, d["labels"])
    results = to_coco_results(dets, val.image_ids, val.label_to_cat_id)
    ref, _ = same_numbers(val.coco, results, val.image_ids)
    assert 0.1 < ref["stats"]["AP"] < 0.9


def test_a_class_without_ground_truth_is_none_in_both(tiny_detections):
    val, results = tiny_detections
    data = dict(val.coco.dataset)
    extra = max(c["id"] for c in data["categories"]) + 1
    data["categories"] = [*data["categories"], {"id": extra, "name": "never_annotated"}]
    gt = COCO()
    gt.dataset = data
    gt.createIndex()
    ghost = [{**r, "category_id": extra} for r in results[:50]]  # detections of the class nobody annotated
    ref, fast = same_numbers(gt, results + ghost, val.image_ids)
    assert ref["per_class"][extra] is None and fast["per_class"][extra] is None
    assert sum(v is not None for v in ref["per_class"].values()) == len(val.class_names)


def test_no_detections_at_all(tiny_detections):
    val, _ = tiny_detections
    ref, _ = same_numbers(val.coco, [], val.image_ids)
    assert ref["stats"]["AP"] == 0.0


def test_a_backend_that_is_not_installed_or_misspelt_is_a_clear_error(tiny_shapes, monkeypatch):
    cfg = compose_train(tiny_train_overrides(tiny_shapes, 1) + ["evaluation.backend=faster_coco_eval"])
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # import faster_coco_eval now raises ImportError
    with pytest.raises(ConfigError, match=r"evaluation.backend=faster_coco_eval needs the faster-coco-eval package.*"
                                          r"pip install 'retinanet\[fast-eval\]'"):
        validate_train_config(cfg)  # before any work: the run refuses to start
    with pytest.raises(ConfigError, match="faster-coco-eval package"):
        coco_evaluate(COCO(), [], backend="faster_coco_eval")
    with pytest.raises(ConfigError, match=r"evaluation.backend='pycoco' is not one of \['pycocotools', "):
        coco_evaluate(COCO(), [], backend="pycoco")

