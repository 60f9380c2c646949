"""``make bench-real`` harness on a tiny Pascal VOC folder: conversion with the project's converter, both
trainings side by side, results read back into one table. No timing or accuracy assertion (a 3-second
budget trains nothing); the benchmark itself is the measurement."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def load_run_module():
    spec = importlib.util.spec_from_file_location("bench_real_run", ROOT / "benchmarks" / "real" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def voc_folder(root: Path, n_train: int = 8, n_val: int = 4) -> Path:
    """A VOC folder with one bright square ("box") or disc ("disc") per 64 x 64 image."""
    voc = root / "tinyvoc"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"img{i:03d}" for i in range(n_train + n_val)]
    for i, name in enumerate(names):
        x0, y0 = (int(v) for v in rng.integers(4, 30, size=2))
        side = int(rng.integers(16, 30))
        pixels = np.full((64, 64, 3), 40, np.uint8)
        pixels[y0:y0 + side, x0:x0 + side] = (220, 200, 60) if i % 2 else (60, 200, 220)
        Image.fromarray(pixels).save(voc / "JPEGImages" / f"{name}.jpg")
        cls = "box" if i % 2 else "disc"
        (voc / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><filename>{name}.jpg</filename><size><width>64</width><height>64</height><depth>3</depth>"
            f"</size><object><name>{cls}</name><difficult>0</difficult><bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}"
            f"</ymin><xmax>{x0 + side}</xmax><ymax>{y0 + side}</ymax></bndbox></object></annotation>")
    (voc / "ImageSets/Main/train.txt").write_text("\n".join(names[:n_train]) + "\n")
    (voc / "ImageSets/Main/val.txt").write_text("\n".join(names[n_train:]) + "\n")
    return voc


def test_conversion_uses_the_project_converter_and_keeps_the_subset(tmp_path):
    run = load_run_module()
    voc = voc_folder(tmp_path)
    files = run.convert(voc, tmp_path / "data", "val", None)
    train, val = (json.loads(files[k].read_text()) for k in ("train", "val"))
    assert (len(train["images"]), len(val["images"])) == (8, 4)
    assert sorted(c["name"] for c in train["categories"]) == ["box", "disc"]
    assert train["annotations"][0]["bbox"][2] > 0  # VOC's 1-based corners became a COCO box
    subset = run.convert(voc, tmp_path / "data", "val", "box")
    kept = json.loads(subset["train"].read_text())
    assert [c["name"] for c in kept["categories"]] == ["box"] and len(kept["images"]) == 8
    assert {a["category_id"] for a in kept["annotations"]} == {kept["categories"][0]["id"]}


@pytest.mark.slow
def test_a_tiny_pair_runs_both_sides_and_reports_both(tmp_path, capsys):
    run = load_run_module()
    voc = voc_folder(tmp_path)
    out = tmp_path / "out"
    summary = run.main(["--voc", str(voc), "--seconds", "3", "--out", str(out), "--data-dir", str(tmp_path / "data")])
    sides = {r["side"]: r for r in summary["rows"]}
    assert set(sides) == {"ours", "tv"}
    for r in sides.values():
        assert r["images"] > 0 and 0 <= r["AP"] <= 1
    assert sides["ours"]["train_seconds"] <= 3.0  # ours never overruns; the script's first step may
    ours_cmd = (out / "pair1" / "ours.cmd").read_text()  # the README's command: experiment=own_data, a time limit
    assert "experiment=own_data" in ours_cmd and "trainer.time_limit=3" in ours_cmd and "model=" not in ours_cmd
    assert json.loads((out / "summary.json").read_text())["rows"] == json.loads(json.dumps(summary["rows"]))
    assert "| 1 | ours |" in (out / "summary.md").read_text() and "mean AP" in capsys.readouterr().out
