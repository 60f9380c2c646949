"""Checkpoints that travel: how a checkpoint was trained never decides where it runs. A checkpoint whose config says
``trainer.precision=16-mixed`` (CUDA's AMP) or ``bf16-mixed`` is evaluated, inferred and exported on a CPU, in the
precision that CPU computes best (fp32 without native bf16, bf16 with it) or in the ``precision=`` given. The
checkpoints are the tiny CPU run's with the training precision written into their config (a real 16-mixed run needs
CUDA); the machine's native bf16 is faked both ways."""

import contextlib
import io
import json

import pytest
import torch

from retinanet import runtime
from retinanet.checkpoint import load_checkpoint
from retinanet.detector import Detector
from retinanet.errors import ConfigError
from retinanet.runtime import inference_dtype

from conftest import compose_cfg, eval_overrides, load_script

LOW = {"score_thresh": 0.001}
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
BF16, FP16 = torch.bfloat16, torch.float16


@pytest.mark.parametrize("device, native, trained, asked, expected", [
    # auto: the device decides, for how the checkpoint was trained
    (CPU, False, "16-mixed", "auto", None), (CPU, False, "bf16-mixed", "auto", None), (CPU, False, "auto", "auto", None),
    (CPU, True, "16-mixed", "auto", BF16), (CPU, True, "bf16-mixed", "auto", BF16), (CPU, True, "auto", "auto", BF16),
    (CPU, True, "32", "auto", None), (CPU, False, "32", "auto", None),
    (CUDA, True, "16-mixed", "auto", FP16), (CUDA, False, "16-mixed", "auto", FP16),
    (CUDA, True, "bf16-mixed", "auto", BF16), (CUDA, False, "bf16-mixed", "auto", None),
    (CUDA, True, "auto", "auto", BF16), (CUDA, False, "auto", "auto", None), (CUDA, True, "32", "auto", None),
    # what the user asks for runs (bf16 emulated where it must be); the trainer's spellings work too
    (CPU, True, "16-mixed", "32", None), (CPU, False, "16-mixed", "bf16", BF16), (CPU, False, "32", "bf16-mixed", BF16),
    (CUDA, True, "32", "fp16", FP16), (CUDA, True, "bf16-mixed", "16-mixed", FP16), (CUDA, True, "16-mixed", "32", None),
])
def test_inference_precision_is_chosen_per_device(monkeypatch, device, native, trained, asked, expected):
    monkeypatch.setattr(runtime, "native_bf16", lambda d: native)
    assert inference_dtype(asked, device, trained) == expected


def test_inference_precision_refusals(monkeypatch):
    monkeypatch.setattr(runtime, "native_bf16", lambda d: True)
    with pytest.raises(ConfigError, match="precision=fp16 needs a CUDA device"):
        inference_dtype("fp16", CPU, "16-mixed")
    with pytest.raises(ConfigError, match="precision='half' is not one of"):
        inference_dtype("half", CPU)
    with pytest.raises(ConfigError, match="the checkpoint's trainer.precision='fp8' is not one of"):
        inference_dtype("auto", CPU, "fp8")


@pytest.fixture(scope="module", params=["16-mixed", "bf16-mixed"])
def mixed(request, tiny_run, tmp_path_factory):
    """The tiny run's checkpoint as if trained with ``trainer.precision=<param>``."""
    ckpt = load_checkpoint(tiny_run.checkpoint)
    ckpt["config"]["trainer"]["precision"] = request.param
    path = tmp_path_factory.mktemp("mixed") / f"{request.param}.pt"
    torch.save(ckpt, path)
    return path


def evaluate(checkpoint, root, out, *extra):
    with contextlib.redirect_stdout(io.StringIO()):
        return load_script("evaluate").run(compose_cfg("evaluate", eval_overrides(
            checkpoint, root, "evaluation.plots.enabled=false", *extra)), out, LOW)


@pytest.fixture(scope="module")
def fp32_stats(tiny_run, tmp_path_factory):
    """The COCO numbers of the tiny run's weights in fp32."""
    return evaluate(tiny_run.checkpoint, tiny_run.root, tmp_path_factory.mktemp("fp32"), "precision=32")["stats"]


def test_a_mixed_precision_checkpoint_evaluates_infers_and_exports_on_a_cpu_without_native_bf16(
        mixed, tiny_run, fp32_stats, tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "native_bf16", lambda d: False)
    assert Detector.from_checkpoint(mixed, "cpu").autocast_dtype is None  # fp32: bf16 would be emulated

    # evaluate: the numbers of the same weights in fp32
    summary = evaluate(mixed, tiny_run.root, tmp_path / "eval")
    assert summary["stats"] == fp32_stats
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["stats"] == fp32_stats

    # infer on a folder of images
    out = tmp_path / "infer"
    result = load_script("infer").run(compose_cfg("infer", [f"checkpoint={mixed}", f"input={tiny_run.root / 'val'}",
                                                            f"output={out}", "progress=false", "render=false"]), out, LOW)
    assert len(result["images"]) == 8 and result["annotations"]

    # export: fp32, checked against fp32 PyTorch
    out = tmp_path / "model.pt"
    meta = load_script("export").run(compose_cfg("export", [f"checkpoint={mixed}", "format=torchscript", "graph=raw",
                                                            f"output={out}"]), tmp_path)
    assert out.is_file() and meta["class_names"]


def test_a_mixed_precision_checkpoint_runs_in_bf16_on_a_cpu_with_native_bf16_or_as_asked(
        mixed, tiny_run, fp32_stats, tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "native_bf16", lambda d: True)
    assert Detector.from_checkpoint(mixed, "cpu").autocast_dtype == BF16
    assert Detector.from_checkpoint(mixed, "cpu", precision="32").autocast_dtype is None
    assert evaluate(mixed, tiny_run.root, tmp_path / "eval32", "precision=32")["stats"] == fp32_stats
    assert evaluate(mixed, tiny_run.root, tmp_path / "eval")["stats"]["AP"] >= 0
