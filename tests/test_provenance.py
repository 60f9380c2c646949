"""Checkpoints say where they come from: versions, git commit, sha256 of the annotation files, the metrics that
made best.pt best, the resolved config; best.pt has a model card (JSON + Markdown) beside it."""

import hashlib
import importlib.metadata
import json
import shutil
import subprocess
import sys

import pytest
import torch
import torchvision

from retinanet.checkpoint import Checkpointer, TrainState, load_checkpoint
from retinanet.data.build import build_dataset
from retinanet.detector import Detector
from retinanet.report.model_card import markdown
from retinanet.report.provenance import file_sha256, git_state

from conftest import ROOT, compose_train, tiny_train_overrides

GIT = shutil.which("git")


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_every_checkpoint_records_versions_commit_data_and_config(tiny_run):
    cfg = compose_train(tiny_train_overrides(tiny_run.root, 1) + ["data.generate=null"])
    train, val = build_dataset(cfg.data, "train", train=False), build_dataset(cfg.data, "val", train=False)
    for name in ("last.pt", "best.pt"):
        ckpt = load_checkpoint(tiny_run.checkpoint.parent / name)
        p = ckpt["provenance"]
        assert p["versions"]["torch"] == torch.__version__ and p["versions"]["torchvision"] == torchvision.__version__
        assert p["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
        try:
            assert p["versions"]["retinanet"] == importlib.metadata.version("retinanet")
        except importlib.metadata.PackageNotFoundError:
            assert p["versions"]["retinanet"] is None
        if GIT and (ROOT / ".git").exists():
            head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
            assert p["git"]["commit"] == head.strip() and isinstance(p["git"]["dirty"], bool)
        for split, dataset, images in (("train", train, 16), ("val", val, 8)):
            facts = p["data"][split]
            assert facts["sha256"] == sha256(dataset.ann_file) and facts["annotations"] == dataset.ann_file
            assert facts["images"] == images and facts["boxes"] == int(dataset.class_counts().sum()) > 0
        assert p["data"]["classes"] == train.class_names and p["data"]["name"] == "shapes"
        assert ckpt["config"]["data"]["val_ann"] == val.ann_file  # the resolved config, as before
        history = ckpt["history"]
        assert ckpt["metrics"] == history[-1]["val"] and ckpt["metrics"]["stats"]["AP"] is not None


def test_best_pt_has_a_model_card_that_mentions_its_ap(tiny_run):
    run_dir = tiny_run.checkpoint.parent
    ckpt = load_checkpoint(run_dir / "best.pt")
    card = json.loads((run_dir / "model_card.json").read_text())
    ap = ckpt["metrics"]["stats"]["AP"]
    assert card["result"]["stats"]["AP"] == pytest.approx(ap) and card["result"]["weights"] == "model"
    names = dict(zip(ckpt["label_map"]["category_ids"], ckpt["label_map"]["class_names"]))
    assert card["result"]["per_class_ap"] == {names[int(c)]: v for c, v in ckpt["metrics"]["per_class"].items()}
    assert card["training"]["steps"] == ckpt["step"] == 2 and card["training"]["epoch"] == 1
    assert card["training"]["images_seen"] == 16 and card["training"]["images_per_s"] > 0
    assert card["data"]["val"]["sha256"] == ckpt["provenance"]["data"]["val"]["sha256"]
    assert card["versions"] == ckpt["provenance"]["versions"] and card["git"] == ckpt["provenance"]["git"]
    model = Detector.from_checkpoint(run_dir / "best.pt", "cpu").model
    assert card["model"]["parameters"] == sum(p.numel() for p in model.parameters())
    text = (run_dir / "model_card.md").read_text()
    assert f"{ap:.3f}" in text and "| AP | AP50 |" in text
    assert "shapes" in text and ckpt["provenance"]["data"]["val"]["annotations"] in text
    assert f"torch {torch.__version__}" in text
    if card["git"]["commit"]:
        assert card["git"]["commit"] in text


def tiny_checkpointer(tmp_path, provenance=None) -> Checkpointer:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return Checkpointer(tmp_path, model, optimizer, scheduler, None, None, sampler_key={}, config={"model": {
        "name": "toy"}, "trainer": {"epochs": 2}}, label_map={"class_names": ["a", "b"], "category_ids": [3, 7]},
        provenance=provenance)


def entry(epoch, ap):
    stats = {"AP": ap, "AP50": ap + 0.1}
    return {"epoch": epoch, "step": 10 * epoch, "train": {"images": 80, "seconds": 4.0},
            "val": {"stats": stats, "per_class": {3: ap, 7: None}, "images": 5}}


def test_best_pt_keeps_the_metrics_that_made_it_best_and_its_card_says_so(tmp_path):
    ckp = tiny_checkpointer(tmp_path, provenance={"git": {"commit": "abc123", "dirty": True}})
    state = TrainState(epoch=1, step=10, curves={"loss": [[5, 1.5], [10, 1.25]], "lr": [[5, 0.1], [10, 0.05]]})
    state.history.append(entry(1, 0.40))
    ckp.save(state, epoch_complete=True, metrics=state.history[-1]["val"])
    ckp.mark_best()
    state.epoch, state.step = 2, 20
    state.history.append(entry(2, 0.30))  # worse: last.pt moves on, best.pt stays
    ckp.save(state, epoch_complete=True, metrics=state.history[-1]["val"])
    best, last = load_checkpoint(tmp_path / "best.pt"), load_checkpoint(tmp_path / "last.pt")
    assert best["metrics"]["stats"]["AP"] == 0.40 and last["metrics"]["stats"]["AP"] == 0.30
    assert best["provenance"]["git"]["commit"] == "abc123"
    card = json.loads((tmp_path / "model_card.json").read_text())
    assert card["training"]["epoch"] == 1 and card["training"]["steps"] == 10
    assert card["training"]["train_seconds"] == 4.0 and card["training"]["images_per_s"] == 20.0
    assert card["result"]["per_class_ap"] == {"a": 0.40, "b": None}
    text = (tmp_path / "model_card.md").read_text()
    assert "0.400" in text and "| b | n/a |" in text and "abc123 (with uncommitted changes)" in text
    # the per-step curves go into the checkpoint and come back on resume
    assert last["curves"]["loss"].tolist() == [[5, 1.5], [10, 1.25]]
    resumed = tiny_checkpointer(tmp_path / "again").load(tmp_path / "last.pt")
    assert resumed.curves == state.curves and resumed.step == 20


def test_a_card_without_provenance_or_evaluation_still_reads():
    from retinanet.report.model_card import model_card

    card = model_card({"model": {"name": "toy"}}, {"class_names": ["a"], "category_ids": [1]}, None,
                      [{"epoch": 1, "train": {"images": 0, "seconds": 0.0}}], None, step=0, parameters=10)
    text = markdown(card)
    assert "Not evaluated." in text and "unknown (not a git checkout)" in text and card["training"]["images_per_s"] is None


def test_git_state_is_none_outside_a_checkout_or_without_git(tmp_path, monkeypatch):
    assert git_state(tmp_path) == {"commit": None, "dirty": None}
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))  # no git executable at all: still no error
    assert git_state(ROOT) == {"commit": None, "dirty": None}


@pytest.mark.skipif(GIT is None, reason="git is not installed")
def test_git_state_reads_the_commit_and_uncommitted_changes(tmp_path):
    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@example.com",
                               *args], check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "a.txt").write_text("one")
    git("add", "a.txt")
    git("commit", "-q", "-m", "one")
    assert git_state(tmp_path) == {"commit": git("rev-parse", "HEAD"), "dirty": False}
    (tmp_path / "a.txt").write_text("two")
    assert git_state(tmp_path)["dirty"] is True
    sub = tmp_path / "sub"
    sub.mkdir()
    assert git_state(sub)["commit"] is None  # inside a repository, but not its top: not "the code's" repository


def test_file_sha256_reads_in_chunks(tmp_path):
    path = tmp_path / "big.json"
    path.write_bytes(b"x" * 3_000_001)
    assert file_sha256(path, chunk=1 << 16) == sha256(path)
