"""scripts/evaluate.py and scripts/infer.py end to end on checkpoints trained for a few iterations: exactly the
numbers the run printed (EMA on and off: the weights that scored are the weights used), category ids remapped
by name, a clear error for other classes, detections on a folder that equal the dataset pipeline's, the
Python API (``Detector.predict``), and clear failures (exit code 2, no traceback) for a missing checkpoint or
an empty folder."""

import contextlib
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from retinanet import Detector
from retinanet.checkpoint import CheckpointError, load_checkpoint
from retinanet.data.build import SkippingCollate, build_dataset, eval_resize
from retinanet.data.transforms import resized_shape
from retinanet.deploy.inputs import InputError
from retinanet.detector import LabelMapError
from retinanet.evaluation import STAT_LABELS, STAT_NAMES
from retinanet.trainer import run as train

from conftest import ROOT, compose_cfg, compose_train, eval_overrides, load_script, tiny_train_overrides, unmatched_detections

BASE = ("batch_size=8",)
LOW = {"score_thresh": 0.001}  # postprocess.score_thresh=0.001 on the command line


@pytest.fixture(scope="module")
def base_eval(tiny_run, tmp_path_factory):
    """scripts/evaluate.py on the tiny run's val split: (summary, output folder, printed text)."""
    out = tmp_path_factory.mktemp("evaluate")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        summary = load_script("evaluate").run(
            compose_cfg("evaluate", eval_overrides(tiny_run.checkpoint, tiny_run.root, *BASE)), out, LOW)
    return summary, out, buf.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("ema", [None, 0.5])
def test_evaluate_reproduces_the_ap_the_run_printed_exactly(tiny_shapes, tmp_path, ema):
    run_dir = tmp_path / "run"
    overrides = tiny_train_overrides(tiny_shapes, out_epochs=1) + [f"trainer.ema.decay={ema or 'null'}"]
    ap = train(compose_train(overrides), run_dir)
    final = json.loads((run_dir / "metrics.json").read_text())["final_ema" if ema else "final"]
    assert ap == final["stats"]["AP"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        summary = load_script("evaluate").run(compose_cfg("evaluate", eval_overrides(run_dir / "best.pt", tiny_shapes)),
                                              tmp_path / "eval")
    assert summary["stats"] == final["stats"]  # every number, exactly
    assert {str(k): v for k, v in summary["per_class"].items()} == final["per_class"]  # JSON keys are strings
    ckpt = load_checkpoint(run_dir / "best.pt")
    weights = Detector.from_checkpoint(run_dir / "best.pt", "cpu").model.state_dict()
    expected = ckpt["ema"]["model"] if ema else ckpt["model"]  # infer / export run the weights that scored
    assert all(torch.equal(weights[k], v) for k, v in expected.items())
    if ema:
        assert any(not torch.equal(ckpt["ema"]["model"][k], v) for k, v in ckpt["model"].items())


def test_evaluate_prints_and_writes_every_number(tiny_run, base_eval):
    summary, out, printed = base_eval
    for label in STAT_LABELS:
        assert label in printed
    ckpt = load_checkpoint(tiny_run.checkpoint)
    for name in ckpt["label_map"]["class_names"]:
        assert f"\n {name} " in printed  # one row per class in the AP table
    assert summary["detections"] > 0
    written = json.loads((out / "metrics.json").read_text())
    assert set(written["stats"]) == set(STAT_NAMES) and len(written["per_class"]) == 6
    results = json.loads((out / "results.json").read_text())
    assert len(results) == summary["detections"]
    assert {r["category_id"] for r in results} <= set(ckpt["label_map"]["category_ids"])
    assert set(results[0]) == {"image_id", "category_id", "bbox", "score"}
    val = build_dataset(compose_cfg("evaluate", eval_overrides(tiny_run.checkpoint, tiny_run.root)).data, "val",
                        train=False)
    assert val.coco.loadRes(results)  # a valid COCO results file for this dataset


def _rewrite_categories(src, dst, fn):
    data = json.loads(src.read_text())
    fn(data)
    dst.write_text(json.dumps(data))
    return dst


def test_evaluate_matches_classes_by_name_and_refuses_other_classes(tiny_run, base_eval, tmp_path):
    evaluate = load_script("evaluate")
    val_ann = tiny_run.root / "annotations" / "instances_val.json"
    base, original = BASE, base_eval[0]

    def shift(data):  # same classes under other ids, e.g. converted separately
        for c in data["categories"]:
            c["id"] += 100
        for a in data["annotations"]:
            a["category_id"] += 100

    shifted = _rewrite_categories(val_ann, tmp_path / "shifted.json", shift)
    out = evaluate.run(compose_cfg("evaluate", eval_overrides(tiny_run.checkpoint, tiny_run.root, *base,
                                                              f"data.val_ann={shifted}")), tmp_path / "b", LOW)
    assert out["stats"] == original["stats"]
    assert {r["category_id"] for r in json.loads((tmp_path / "b" / "results.json").read_text())} <= {
        c + 100 for c in load_checkpoint(tiny_run.checkpoint)["label_map"]["category_ids"]}

    renamed = _rewrite_categories(val_ann, tmp_path / "renamed.json",
                                  lambda d: d["categories"][0].update(name="zebra"))
    with pytest.raises(LabelMapError) as err:
        evaluate.run(compose_cfg("evaluate", eval_overrides(tiny_run.checkpoint, tiny_run.root, *base,
                                                            f"data.val_ann={renamed}")), tmp_path / "c", LOW)
    msg = str(err.value)
    assert "renamed.json" in msg and "Missing from the dataset: ['ellipse']" in msg and "['zebra']" in msg


# inference larger than the training resize (a test of the override): P7 stays above 1x1, which a
# GroupNorm head cannot normalise for a batch of one image
LARGER = ("eval_min_size=160", "eval_max_size=224")


@pytest.mark.parametrize("precision", ["auto", "bf16-mixed"])  # what this machine picks; bf16 (emulated if need be)
def test_infer_on_a_folder(tiny_run, tmp_path, precision):
    infer = load_script("infer")
    src = tiny_run.root / "val"
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(src / "000000.png", folder / "a.png")
    shutil.copy(src / "000001.png", folder / "sub" / "png_named.jpg")  # decoded by content
    Image.open(src / "000002.png").convert("L").save(folder / "sub" / "grey.tif")
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.jpg").write_bytes((src / "000003.png").read_bytes()[:200])
    out = tmp_path / "out"
    cfg = compose_cfg("infer", [f"checkpoint={tiny_run.checkpoint}", f"input={folder}", f"output={out}",
                                "render_score_thresh=0.001", "batch_size=2", "progress=false", f"precision={precision}",
                                *LARGER])
    result = infer.run(cfg, out, LOW)
    assert json.loads((out / "detections.json").read_text()) == json.loads(json.dumps(result))
    names = {img["file_name"]: img for img in result["images"]}
    assert set(names) == {"a.png", "sub/png_named.jpg", "sub/grey.tif"}
    with Image.open(src / "000000.png") as im:
        assert (names["a.png"]["width"], names["a.png"]["height"]) == im.size
    assert result["skipped_files"] == [str(folder / "notes.txt")]
    assert result["unreadable_files"] == [str(folder / "broken.jpg")]
    ckpt = load_checkpoint(tiny_run.checkpoint)
    id_to_name = dict(zip(ckpt["label_map"]["category_ids"], ckpt["label_map"]["class_names"]))
    assert result["annotations"] and all(id_to_name[a["category_id"]] == a["category_name"]
                                         for a in result["annotations"])
    assert len({a["id"] for a in result["annotations"]}) == len(result["annotations"])
    for name in names:  # a rendered copy of every image, same size, with boxes drawn on it
        rendered = out / "rendered" / (name if not name.endswith(".tif") else name[:-4] + ".png")
        with Image.open(rendered) as im:
            assert im.size == (names[name]["width"], names[name]["height"])
    original = np.asarray(Image.open(src / "000000.png").convert("RGB"))
    assert (np.asarray(Image.open(out / "rendered" / "a.png")) != original).any()

    # the detections of a.png are those of the dataset pipeline for the same image (batch of one)
    detector = Detector.from_checkpoint(tiny_run.checkpoint, "cpu", min_size=160, max_size=224, postprocess=LOW,
                                        precision=precision)
    val = build_dataset(compose_cfg("evaluate", eval_overrides(tiny_run.checkpoint, tiny_run.root)).data, "val",
                        train=False)
    val.transform = detector.transform()
    ours = sorted((a["bbox"], a["score"]) for a in result["annotations"] if a["file_name"] == "a.png")
    single = infer.run(compose_cfg("infer", [f"checkpoint={tiny_run.checkpoint}", f"input={folder / 'a.png'}",
                                             "render=false", "progress=false", f"precision={precision}", *LARGER]),
                       tmp_path / "one", LOW)
    det = detector.detect_batch(SkippingCollate(detector.size_divisible)([val[0]]))[0][0]
    boxes = det["boxes"].double().numpy()
    assert len(single["annotations"]) == len(boxes) > 0
    got = np.array([a["bbox"] for a in single["annotations"]])
    np.testing.assert_allclose(got[:, :2], boxes[:, :2], atol=0.01)
    np.testing.assert_allclose(got[:, 2:], boxes[:, 2:] - boxes[:, :2], atol=0.02)
    assert len(ours) > 0

    # the Python API gives the same detections, from a path, a PIL image or an array, one or many
    from_path = detector.predict(str(folder / "a.png"))
    assert torch.allclose(from_path["boxes"], det["boxes"]) and torch.equal(from_path["labels"], det["labels"])
    assert from_path["class_names"] == [detector.class_names[k] for k in det["labels"].tolist()]
    image = Image.open(folder / "a.png")
    # in one batch, the same detections as alone, as matched sets up to the precision's tolerance (the tiny run scores
    # every anchor about 0.01-0.03: near-ties everywhere; docs/export_and_inference.md, "Batches")
    many = detector.predict([image, np.asarray(image.convert("RGB"))])
    assert len(many) == 2 and all(not unmatched_detections(r, det, detector.autocast_dtype) for r in many)


def test_clear_errors_for_inputs_and_checkpoints(tmp_path):
    from retinanet.deploy.inputs import find_images

    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="folder .*empty.* holds no image file"):
        find_images(str(tmp_path / "empty"))
    with pytest.raises(InputError, match="does not exist"):
        find_images(str(tmp_path / "nope"))
    with pytest.raises(InputError, match="glob"):
        find_images(str(tmp_path / "*.jpg"))
    with pytest.raises(CheckpointError, match="checkpoint .*missing.pt.* does not exist"):
        Detector.from_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt.* cannot be read"):
        Detector.from_checkpoint(tmp_path / "junk.pt")
    torch.save({"model": {}}, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="no 'config' entry"):
        Detector.from_checkpoint(tmp_path / "bare.pt")


@pytest.mark.slow
@pytest.mark.parametrize("script, args, expected", [
    ("evaluate", ["checkpoint=/no/such/run/best.pt"], "checkpoint '/no/such/run/best.pt' does not exist"),
    ("infer", ["checkpoint=/no/such/run/best.pt", "input=EMPTY"], "holds no image file"),
])
def test_cli_fails_clearly_with_exit_code_2(script, args, expected, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no images here")
    args = [a.replace("EMPTY", str(tmp_path / "empty")) for a in args]
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / f"{script}.py"), *args,
                           f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert expected in text and "Traceback" not in text


def test_evaluation_resize_is_separate_from_the_training_resize(tiny_run):
    """data.eval_min_size / eval_max_size resize the val split only; null falls back key by key."""
    base = tiny_train_overrides(tiny_run.root) + ["data.generate=null", "data.min_size=64", "data.max_size=64"]
    cfg = compose_train(base + ["data.eval_min_size=96", "data.eval_max_size=128"])
    train, val = build_dataset(cfg.data, "train", train=True), build_dataset(cfg.data, "val", train=False)
    assert (train.transform.min_size, train.transform.max_size) == (64, 64)
    assert (val.transform.min_size, val.transform.max_size) == (96, 128)
    with Image.open(tiny_run.root / "val" / "000000.png") as im:
        width, height = im.size
    assert tuple(val[0]["image"].shape[:2]) == resized_shape(height, width, 96, 128) != (height, width)  # HWC
    only_max = compose_train(base + ["data.eval_max_size=80"]).data
    assert eval_resize(only_max) == (64, 80)
    assert eval_resize({"min_size": [48, 64], "max_size": 96}) == ([48, 64], 96)  # older configs: no eval keys


def test_checkpoint_evaluates_at_its_evaluation_resize(tiny_run, tmp_path):
    ckpt = load_checkpoint(tiny_run.checkpoint)
    assert (ckpt["config"]["data"]["eval_min_size"], ckpt["config"]["data"]["eval_max_size"]) == (None, None)
    detector = Detector.from_checkpoint(tiny_run.checkpoint, "cpu")
    assert (detector.min_size, detector.max_size) == (64, 96)  # the training resize
    ckpt["config"]["data"]["eval_min_size"] = 100
    path = tmp_path / "eval_resize.pt"
    torch.save(ckpt, path)
    detector = Detector.from_checkpoint(path, "cpu")
    assert (detector.min_size, detector.max_size) == (100, 96)
    assert detector.transform().min_size == 100
    detector = Detector.from_checkpoint(path, "cpu", min_size=80, max_size=120)  # explicit values (evaluate.py / infer.py) win
    assert (detector.min_size, detector.max_size) == (80, 120)
