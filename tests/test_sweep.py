"""Sweeps: a real 2 x 1 Hydra multirun of scripts/train.py on tiny data gives two run dirs and a
summary with two rows holding the right overrides; the summary logic on hand-made run dirs
(sorting, unfinished runs, averaging, heatmap)."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from retinanet.sweep import ap_grid, collect_runs, summarize_sweep, to_markdown, varying_keys

from conftest import ROOT, tiny_train_overrides


def summarize_main(argv):
    """scripts/summarize_sweep.py's main() (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("summarize_sweep", ROOT / "scripts" / "summarize_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


@pytest.mark.slow
def test_multirun_2x1_gives_two_runs_and_a_summary(tiny_shapes, tmp_path):
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "-m", "loss.gamma=0,2", "loss.alpha=0.5",
           *tiny_train_overrides(tiny_shapes, out_epochs=1), "trainer.threads=1", f"hydra.sweep.dir={sweep_dir}",
           "hydra.sweep.subdir=${hydra.job.num}",
           "++hydra.callbacks.summarize_sweep._target_=retinanet.sweep.SummarizeSweep"]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    run_dirs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [p.name for p in run_dirs] == ["0", "1"]
    for run_dir, gamma in zip(run_dirs, ("0", "2")):
        overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
        assert f"loss.gamma={gamma}" in overrides and "loss.alpha=0.5" in overrides
        final = json.loads((run_dir / "metrics.json").read_text())["final"]["stats"]
        assert 0.0 <= final["AP"] <= 1.0
        assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))

    # the callback summarised the sweep when the multirun ended and printed the table
    assert "| rank | `loss.gamma` |" in proc.stdout
    rows = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    assert len(rows) == 2
    assert sorted(r["loss.gamma"] for r in rows) == ["0", "2"]
    assert all("loss.alpha=0.5" in r["overrides"].split() and r["status"] == "ok" for r in rows)
    aps = [float(r["AP"]) for r in rows]
    assert aps == sorted(aps, reverse=True)
    for r in rows:
        final = json.loads((sweep_dir / r["run"] / "metrics.json").read_text())["final"]["stats"]
        assert float(r["AP"]) == pytest.approx(final["AP"], abs=5e-4)
        assert f"loss.gamma={r['loss.gamma']}" in r["overrides"].split()
    md = (sweep_dir / "summary.md").read_text()
    assert md.count("\n| ") == 4  # header, separator, 2 rows
    assert "Common overrides:" in md and "`loss.alpha=0.5`" in md
    with Image.open(sweep_dir / "heatmap.png") as im:
        assert im.size[0] > 100 and im.size[1] > 100


def fake_run(root: Path, name: str, overrides: list[str], ap: float | None, config: dict | None = None,
             epochs_done: int = 1) -> Path:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if config is not None:
        (run / "config.yaml").write_text(yaml.safe_dump(config))
    if ap is None:
        metrics = {"history": [{"epoch": e} for e in range(epochs_done)]}
    else:
        metrics = {"history": [], "final": {"stats": {"AP": ap, "AP50": ap + 0.2, "AR100": ap + 0.1}}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_summary_sorts_by_ap_lists_unfinished_last_and_averages_repeated_cells(tmp_path):
    common = "data.root=/d"
    cfg = lambda g, a: {"loss": {"gamma": g, "alpha": a}}  # noqa: E731
    fake_run(tmp_path, "0", [common, "loss.gamma=0", "loss.alpha=0.25"], 0.10, cfg(0, 0.25))
    fake_run(tmp_path, "1", [common, "loss.gamma=2", "loss.alpha=0.25"], 0.30, cfg(2.0, 0.25))
    fake_run(tmp_path, "2", [common, "loss.gamma=2", "loss.alpha=0.75"], None, cfg(2.0, 0.75), epochs_done=3)
    fake_run(tmp_path, "3", [common, "loss.gamma=0", "loss.alpha=0.75"], 0.20, cfg(0, 0.75))
    fake_run(tmp_path, "4", [common, "loss.gamma=0", "loss.alpha=0.75", "seed=1"], 0.40, cfg(0, 0.75))
    fake_run(tmp_path, "nested/5", [common, "loss.gamma=1"], 0.05, None)  # alpha from nowhere: default unknown
    runs = collect_runs(tmp_path)
    assert [r.path.name for r in runs] == ["4", "1", "3", "0", "5", "2"]
    assert runs[-1].stats is None and runs[-1].status == "unfinished (3 epochs done)"
    assert varying_keys(runs) == ["loss.gamma", "loss.alpha", "seed"]

    rows, cols, means, counts = ap_grid(runs)
    assert rows == ["0", "1", "2"] and cols == ["0.25", "0.75", "None"]
    assert means[0] == [pytest.approx(0.10), pytest.approx(0.30), None]  # (0, 0.75): mean of 0.2 and 0.4
    assert counts[0] == [1, 2, 0] and means[1] == [None, None, pytest.approx(0.05)]
    assert means[2] == [pytest.approx(0.30), None, None]  # the unfinished run leaves its cell empty

    md = to_markdown(runs, tmp_path)
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    assert lines[0] == ("| rank | `loss.gamma` | `loss.alpha` | `seed` | AP | AP50 | AP75 | APs | APm | APl | AR100 "
                        "| run |")
    assert set(lines[1].replace("|", "").split()) == {"---:"}
    assert lines[2].startswith("| 1 | 0 | 0.75 | 1 | 0.400 | 0.600 |")
    assert lines[-1].startswith("| - | 2 | 0.75 |  | unfinished (3 epochs done) |")
    assert "Common overrides: `data.root=/d`" in md

    out = summarize_sweep(tmp_path, tmp_path / "out")
    assert out["heatmap"].is_file() and Image.open(out["heatmap"]).format == "PNG"
    rows_csv = list(csv.DictReader(out["csv"].open()))
    assert [r["rank"] for r in rows_csv] == ["1", "2", "3", "4", "5", ""]
    assert rows_csv[0]["overrides"] == "data.root=/d loss.gamma=0 loss.alpha=0.75 seed=1"


def test_script_reports_a_folder_without_runs(tmp_path, capsys):
    assert summarize_main([str(tmp_path)]) == 2
    assert "no runs in" in capsys.readouterr().err
    fake_run(tmp_path, "0", ["loss.gamma=3"], 0.5, {"loss": {"gamma": 3, "alpha": 0.25}})
    assert summarize_main([str(tmp_path), "--metric", "AP50"]) == 0
    printed = capsys.readouterr().out
    assert "| 1 | 0.500 | 0.700 |" in printed and (tmp_path / "heatmap.png").is_file()
