"""Export (retinanet/deploy/export.py, scripts/export.py): the exported files compute what the PyTorch ``Detector`` computes.

ONNX in onnxruntime against the ``Detector`` in fp32 on the same real images, at two image sizes and batch sizes
(one exported file: its dynamic axes must really work): raw outputs within ``RAW_ATOL`` (absolute, on logits of
a range of tens), end-to-end detections the same (count, labels; boxes within 0.01 px, scores within 1e-5).
TorchScript and torch.export round trips; the sidecar; the EMA weights; clear errors. And ``scripts/infer.py``
on the exported ONNX model gives the checkpoint's detections.json.

The tiny run's checkpoint (2 training steps) scores every anchor about 0.01-0.03: near-ties everywhere, the
opposite of a trained model. Parity is about arithmetic, so the tests sharpen it: its class and box predictor
weights are multiplied by 10, which spreads the scores over 0.05-0.99 and varies the boxes.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

# onnxruntime and onnxscript come with the [dev] extra that `make test` installs: a missing one fails here
import onnxruntime  # noqa: F401
import onnxscript  # noqa: F401
import pytest
import torch

from retinanet.checkpoint import load_checkpoint
from retinanet.data.collate import Collate
from retinanet.data.image_io import load_rgb
from retinanet.deploy.export import (
    ExportError,
    build_graph,
    check_export,
    export_checkpoint,
    export_detector,
    load_exported,
    load_sidecar,
)
from retinanet.detector import Detector, image_sample
from retinanet.postprocess import PostProcessor

from conftest import ROOT, compose_cfg, load_script

RAW_ATOL = 1e-4
SIZES = ({"min_size": None, "max_size": None, "batch": 3},   # the checkpoint's resize (64 / 96): 64-96 px inputs
         {"min_size": 128, "max_size": 160, "batch": 2})    # larger, another batch size: 128-160 px inputs


@pytest.fixture(scope="module")
def sharp_ckpt(tiny_run, tmp_path_factory) -> Path:
    ckpt = load_checkpoint(tiny_run.checkpoint)
    for name in ("cls_head.predictor.weight", "box_head.predictor.weight"):
        ckpt["model"][name] = ckpt["model"][name] * 10
    path = tmp_path_factory.mktemp("sharp") / "sharp.pt"
    torch.save(ckpt, path)
    return path


def fp32_detector(ckpt, min_size=None, max_size=None, postprocess=None) -> Detector:
    detector = Detector.from_checkpoint(ckpt, "cpu", min_size, max_size, postprocess=postprocess)
    detector.autocast_dtype = None  # exports are fp32: compare with fp32 (the CPU preset may run bf16 here)
    return detector


def val_batches(root, detector, batch: int):
    """The val images of the tiny dataset, resized by ``detector``, collated ``batch`` at a time."""
    paths = sorted((root / "val").glob("*.png"))
    transform, collate = detector.transform(), Collate(detector.size_divisible)
    samples = [image_sample(transform, load_rgb(p), i) for i, p in enumerate(paths)]
    return [collate(samples[i:i + batch]) for i in range(0, len(samples), batch)]


@pytest.fixture(scope="module")
def onnx_files(sharp_ckpt, tmp_path_factory):
    """Both graphs exported to ONNX by scripts/export.py's run (with its own check on random images)."""
    out = tmp_path_factory.mktemp("onnx")
    export = load_script("export")
    metas = {}
    for graph in ("raw", "end2end"):
        cfg = compose_cfg("export", [f"checkpoint={sharp_ckpt}", "format=onnx", f"graph={graph}",
                                     f"output={out / f'{graph}.onnx'}"])
        metas[graph] = export.run(cfg, out)
    return {graph: out / f"{graph}.onnx" for graph in metas}, metas


def test_onnx_raw_outputs_match_pytorch_at_two_sizes_and_batch_sizes(sharp_ckpt, tiny_run, onnx_files):
    run = load_exported(onnx_files[0]["raw"], "onnx")
    shapes = set()
    for size in SIZES:
        detector = fp32_detector(sharp_ckpt, size["min_size"], size["max_size"])
        for batch in val_batches(tiny_run.root, detector, size["batch"]):
            with torch.no_grad():
                out, anchors = detector.outputs(batch.images)
            logits, deltas, onnx_anchors = run(batch.images)
            shapes.add(tuple(batch.images.shape))
            assert logits.shape == out.cls_logits.shape and deltas.shape == out.box_deltas.shape
            np.testing.assert_allclose(logits.numpy(), out.cls_logits.numpy(), rtol=0, atol=RAW_ATOL)
            np.testing.assert_allclose(deltas.numpy(), out.box_deltas.numpy(), rtol=0, atol=RAW_ATOL)
            np.testing.assert_allclose(onnx_anchors.numpy(), anchors.numpy(), rtol=0, atol=1e-4)
            assert float(out.cls_logits.max() - out.cls_logits.min()) > 10  # the tolerance is small against the range
    assert len({s[0] for s in shapes}) >= 2 and len({s[2:] for s in shapes}) >= 3  # batch sizes and image sizes


def assert_same_detections(ours: dict, theirs: dict, box_tol: float = 1e-2, score_tol: float = 1e-5):
    """The same detections: as many, scores (sorted) within ``score_tol``, and each of ours matched one to one with
    one of theirs of the same label, box within ``box_tol`` px and score within ``score_tol``. Not position by
    position: two detections whose scores differ by less than float rounding (1e-7, seen on the shapes val set)
    may come in either order."""
    n = len(ours["scores"])
    assert len(theirs["scores"]) == n
    np.testing.assert_allclose(theirs["scores"].numpy(), ours["scores"].numpy(), rtol=0, atol=score_tol)
    free = list(range(n))
    for i in range(n):
        fits = [j for j in free if int(theirs["labels"][j]) == int(ours["labels"][i])
                and float((theirs["boxes"][j] - ours["boxes"][i]).abs().max()) <= box_tol
                and abs(float(theirs["scores"][j] - ours["scores"][i])) <= score_tol]
        assert fits, f"detection {i} (label {int(ours['labels'][i])}, box {ours['boxes'][i].tolist()}) has no match"
        free.remove(min(fits, key=lambda j: abs(j - i)))


@pytest.mark.parametrize("graph", ["end2end", "raw"])
def test_onnx_detections_match_the_detector(sharp_ckpt, tiny_run, onnx_files, graph):
    from retinanet.deploy.onnx_detector import OnnxDetector

    counts = []
    for size in SIZES:
        detector = fp32_detector(sharp_ckpt, size["min_size"], size["max_size"])
        onnx = OnnxDetector(onnx_files[0][graph], "cpu", size["min_size"], size["max_size"])
        for batch in val_batches(tiny_run.root, detector, size["batch"]):
            for ours, theirs in zip(detector.detect_batch(batch)[0], onnx.detect_batch(batch)[0]):
                assert_same_detections(theirs, ours)
                counts.append(len(ours["scores"]))
    assert sum(counts) > 100 and max(counts) == 100  # many detections, some images at the detections_per_img cap


def test_sidecar_says_what_a_deployment_needs(sharp_ckpt, onnx_files):
    import onnxruntime as ort

    files, metas = onnx_files
    ckpt = load_checkpoint(sharp_ckpt)
    for graph, path in files.items():
        meta = load_sidecar(path)
        assert meta == metas[graph]
        assert meta["format"] == "onnx" and meta["graph"] == graph and meta["model_file"] == path.name
        assert meta["class_names"] == ckpt["label_map"]["class_names"]
        assert meta["category_ids"] == ckpt["label_map"]["category_ids"]
        assert meta["resize"]["min_size"] == 64 and meta["resize"]["max_size"] == 96 and meta["size_divisible"] == 32
        assert meta["normalization"]["in_model"] is True
        np.testing.assert_allclose(meta["normalization"]["mean"], [0.485, 0.456, 0.406])
        np.testing.assert_allclose(meta["normalization"]["std"], [0.229, 0.224, 0.225])
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i["name"] for i in meta["inputs"]] == [i.name for i in session.get_inputs()]
        assert [o["name"] for o in meta["outputs"]] == [o.name for o in session.get_outputs()]
        assert meta["weights"] == "model" and meta["postprocess"]["in_graph"] == (graph == "end2end")
        assert str(ROOT) not in json.dumps({k: v for k, v in meta.items() if k != "checkpoint"})


def test_torchscript_and_torch_export_round_trips(sharp_ckpt, tiny_run, tmp_path):
    base = fp32_detector(sharp_ckpt)
    # a threshold between the images' best scores: some images of a batch have detections, others none
    best = [float(d["scores"].max()) if len(d["scores"]) else 0.0
            for b in val_batches(tiny_run.root, base, 4) for d in base.detect_batch(b)[0]]
    thresh = float(np.median(best))
    exported = {}
    for fmt, graph, suffix in (("torchscript", "raw", ".pt"), ("torch_export", "raw", ".pt2"),
                               ("torch_export", "end2end", ".pt2")):
        detector = fp32_detector(sharp_ckpt, postprocess={"score_thresh": thresh})
        path = tmp_path / f"{fmt}_{graph}{suffix}"
        export_detector(detector, fmt, graph, path)
        exported[fmt, graph] = load_exported(path, fmt)
    empty = 0
    for size in SIZES:
        detector = fp32_detector(sharp_ckpt, size["min_size"], size["max_size"], postprocess={"score_thresh": thresh})
        graph = build_graph(detector, "end2end")
        for batch in val_batches(tiny_run.root, detector, size["batch"]):
            with torch.no_grad():
                out, anchors = detector.outputs(batch.images)
                expected = graph(batch.images, batch.image_sizes)
            for fmt in ("torchscript", "torch_export"):
                logits, deltas, got_anchors = exported[fmt, "raw"](batch.images)
                np.testing.assert_allclose(logits.numpy(), out.cls_logits.numpy(), rtol=0, atol=RAW_ATOL)
                np.testing.assert_allclose(deltas.numpy(), out.box_deltas.numpy(), rtol=0, atol=RAW_ATOL)
                np.testing.assert_allclose(got_anchors.numpy(), anchors.numpy(), rtol=0, atol=1e-4)
            got = exported["torch_export", "end2end"](batch.images, batch.image_sizes)
            for e, g in zip(expected, got):
                np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=0, atol=1e-4)
            # the padded graph output is the Detector's detections (before the mapping to the original image)
            per_level = detector.anchors.num_anchors_per_level(out.feature_shapes)
            resized = detector.postprocess(out.cls_logits, out.box_deltas, anchors, per_level, batch.image_sizes)
            for b, det in enumerate(resized):
                n = int(got[3][b])
                empty += n == 0
                assert_same_detections(det, {"boxes": got[0][b, :n], "scores": got[1][b, :n], "labels": got[2][b, :n]})
                assert (got[2][b, n:] == -1).all() and (got[1][b, n:] == 0).all() and (got[0][b, n:] == 0).all()
    assert empty > 0  # images without any detection went through the exported NMS too


def test_padded_postprocess_equals_the_per_image_results():
    """``PostProcessor.padded`` (the exported form) against ``__call__`` on many candidates, a small cap, and an
    image without any detection."""
    from retinanet.anchors import AnchorGenerator

    gen = torch.Generator().manual_seed(3)
    anchor_gen = AnchorGenerator(sizes=(16, 32, 64), strides=(8, 16, 32))
    shapes = [(12, 16), (6, 8), (3, 4)]
    anchors = anchor_gen(shapes, (96, 128))
    per_level = anchor_gen.num_anchors_per_level(shapes)
    logits = torch.randn(3, anchors.shape[0], 5, generator=gen) * 3 - 2
    logits[1] = -20  # nothing above the threshold
    deltas = torch.randn(3, anchors.shape[0], 4, generator=gen) * 0.3
    sizes = torch.tensor([[96, 128], [90, 120], [64, 100]])
    post = PostProcessor(score_thresh=0.3, topk_candidates=200, nms_thresh=0.5, detections_per_img=40)
    boxes, scores, labels, counts = post.padded(logits, deltas, anchors, per_level, sizes)
    assert boxes.shape == (3, 40, 4) and counts.tolist()[1] == 0
    for b, det in enumerate(post(logits, deltas, anchors, per_level, sizes)):
        n = int(counts[b])
        assert n == len(det["scores"]) <= 40
        assert torch.equal(labels[b, :n], det["labels"]) and (labels[b, n:] == -1).all()
        torch.testing.assert_close(boxes[b, :n], det["boxes"], rtol=0, atol=1e-4)
        torch.testing.assert_close(scores[b, :n], det["scores"])
    assert counts.tolist()[0] == 40  # the cap was reached


def test_export_runs_the_weights_that_scored(tiny_run, tmp_path):
    """A checkpoint with an EMA exports the EMA weights (what evaluate and infer run), and says so."""
    ckpt = load_checkpoint(tiny_run.checkpoint)
    ema = {**ckpt["model"], "cls_head.predictor.bias": ckpt["model"]["cls_head.predictor.bias"] + 0.5}
    ckpt["ema"] = {"model": ema, "decay": 0.9, "updates": 2}
    path = tmp_path / "with_ema.pt"
    torch.save(ckpt, path)
    detector, meta_path = export_checkpoint(path, "torchscript", "raw", tmp_path / "ema.pt")
    assert json.loads(meta_path.read_text())["weights"] == "ema"
    images = torch.randint(0, 256, (1, 3, 64, 96), dtype=torch.uint8)
    logits = load_exported(tmp_path / "ema.pt", "torchscript")(images)[0]
    for weights, same in (("ema", True), ("model", False)):
        reference = fp32_detector(path) if weights == "ema" else Detector.from_checkpoint(path, "cpu", weights="model")
        with torch.no_grad():
            expected = reference.model.float()(images).cls_logits
        assert torch.allclose(logits, expected, atol=1e-5) == same


def test_export_refuses_what_cannot_work(sharp_ckpt, tmp_path):
    detector = fp32_detector(sharp_ckpt)
    with pytest.raises(ExportError, match="format=torchscript exports graph=raw only"):
        export_detector(detector, "torchscript", "end2end", tmp_path / "m.pt")
    with pytest.raises(ExportError, match=r"output='.*m\.onnx': format=torch_export writes a \.pt2 file"):
        export_detector(detector, "torch_export", "raw", tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="format='tflite' must be one of"):
        export_detector(detector, "tflite", "raw", tmp_path / "m.tflite")
    with pytest.raises(ExportError, match="graph='boxes' must be one of"):
        export_detector(detector, "onnx", "boxes", tmp_path / "m.onnx")
    (tmp_path / "lonely.onnx").write_bytes(b"")
    with pytest.raises(ExportError, match="has no sidecar .*lonely.onnx.json"):
        load_sidecar(tmp_path / "lonely.onnx")
    assert not any(p.suffix in (".pt", ".pt2") for p in tmp_path.iterdir())  # nothing half-written left behind


@pytest.mark.parametrize("graph, head, complaint", [("raw", "cls_head", "cls_logits"),
                                                     ("end2end", "box_head", "detections without a match")])
def test_check_export_catches_a_wrong_file(sharp_ckpt, onnx_files, graph, head, complaint):
    """The export's own check (scripts/export.py check=true) fails on a file that computes something else."""
    other = fp32_detector(sharp_ckpt)
    with torch.no_grad():
        getattr(other.model, head).predictor.bias += 0.01  # logits by 0.01, or boxes by about 0.01 anchor sizes
    with pytest.raises(ExportError, match=f"differs from PyTorch .*{complaint}"):
        check_export(other, "onnx", graph, onnx_files[0][graph])


def test_infer_on_the_exported_onnx_gives_the_checkpoints_detections(sharp_ckpt, tiny_run, onnx_files, tmp_path):
    infer = load_script("infer")
    results = {}
    for name, model in (("checkpoint", sharp_ckpt), ("onnx", onnx_files[0]["end2end"])):
        out = tmp_path / name
        cfg = compose_cfg("infer", [f"checkpoint={model}", f"input={tiny_run.root / 'val'}", f"output={out}",
                                    "render=false", "progress=false", "precision=32", "batch_size=3"])
        results[name] = infer.run(cfg, out)
        assert json.loads((out / "detections.json").read_text())["annotations"] == results[name]["annotations"]
    ours, theirs = results["checkpoint"], results["onnx"]
    assert ours["images"] == theirs["images"] and len(ours["annotations"]) == len(theirs["annotations"]) > 100

    def detections(result, image_id):
        anns = [a for a in result["annotations"] if a["image_id"] == image_id]
        return {"boxes": torch.tensor([a["bbox"] for a in anns], dtype=torch.float64).reshape(-1, 4),
                "scores": torch.tensor([a["score"] for a in anns], dtype=torch.float64),
                "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)}

    for image in ours["images"]:
        # within 0.01 px and 1e-5: one step of the rounding of detections.json (the values differ by ~1e-5 px, 1e-6)
        assert_same_detections(detections(ours, image["id"]), detections(theirs, image["id"]), box_tol=0.01 + 1e-6,
                               score_tol=1e-5 + 1e-9)
    with pytest.raises(ExportError, match=r"postprocess \{'score_thresh': 0.2\} cannot change"):
        infer.run(compose_cfg("infer", [f"checkpoint={onnx_files[0]['end2end']}", f"input={tiny_run.root / 'val'}",
                                        "progress=false"]), tmp_path / "x", {"score_thresh": 0.2})


@pytest.mark.slow
def test_export_cli_fails_clearly_with_exit_code_2(sharp_ckpt, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "export.py"), f"checkpoint={sharp_ckpt}",
                           "format=torchscript", "graph=end2end", f"output={tmp_path / 'm.pt'}",
                           f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert "format=torchscript exports graph=raw only" in text and "Traceback" not in text
