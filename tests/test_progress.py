"""Logs a cluster can read: ``trainer.progress=auto`` draws tqdm bars on a terminal only; elsewhere a progress
line every ``trainer.log_every_seconds``."""

import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

from retinanet.engine import StepResult
from retinanet.errors import ConfigError
from retinanet.report.progress import ProgressLog, bars_wanted, duration, lines_wanted

from conftest import ROOT, TIMEOUT, compose_train, make_micro_shapes, micro_overrides

LINE = re.compile(r"step (\d+)/(\d+) \(epoch (\d+)\): (?:[\d.]+ images/s|images/s: measuring), "
                  r"loss [\d.]+ \(cls [\d.]+, box [\d.]+\), lr [\d.e+-]+, (?:about \w+ left|time left: measuring)")


def test_a_run_with_stdout_in_a_file_logs_progress_lines_and_no_carriage_returns(tmp_path):
    root = make_micro_shapes(tmp_path / "micro")
    log_file = tmp_path / "train.log"
    overrides = micro_overrides(root, epochs=2) + ["trainer.progress=auto", "trainer.log_every_seconds=0.001",
                                                   f"hydra.run.dir={tmp_path / 'run'}"]
    with log_file.open("w") as f:  # stdout and stderr both to the file, as SLURM writes a job's output
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *overrides], stdout=f,
                              stderr=subprocess.STDOUT, timeout=TIMEOUT, cwd=tmp_path,
                              env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    text = log_file.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "\r" not in text  # no progress bar
    lines = [LINE.search(line) for line in text.splitlines()]
    steps = [(int(m.group(1)), int(m.group(2)), int(m.group(3))) for m in lines if m]
    assert steps == [(s, 8, 1 if s <= 4 else 2) for s in range(1, 9)], text[-3000:]  # every step: 1 ms apart
    assert "about" in text and "images/s," in text  # timed from the second line on
    assert LINE.search((tmp_path / "run" / "train.log").read_text())  # in the run's log file too


def step(n: int, loss: float = 1.0, images: int = 4, skipped: bool = False) -> StepResult:
    return StepResult(step=n, terms={"loss": loss, "loss_cls": loss / 2, "loss_box": loss / 2}, num_pos=10,
                      images=images, grad_norm=1.0, lr=1e-3, skipped=skipped)


def test_progress_lines_come_every_interval_with_the_pace_and_time_left_since_the_previous_one():
    now = [0.0]
    plan = SimpleNamespace(total=100, budget=None)
    progress = ProgressLog(60, plan, clock=lambda: now[0])
    first = progress.after_step(step(1), epoch=1, spent_s=2.0)
    assert first == "step 1/100 (epoch 1): images/s: measuring, loss 1.0000 (cls 0.5000, box 0.5000), " \
                    "lr 1.00e-03, time left: measuring"
    spent = 2.0
    for n in range(2, 11):  # 9 steps of 1 s (training), 10 s of wall time apart: one line at the 6th
        now[0] += 10
        spent += 1.0
        line = progress.after_step(step(n, loss=float(n), skipped=n == 3), epoch=1, spent_s=spent)
        assert (line is not None) == (n == 7)
        if n == 7:  # steps 2..7: 24 images in 6 s; losses of the finite ones (2, 4, 5, 6, 7); 93 steps of 1 s left
            assert line == "step 7/100 (epoch 1): 4.0 images/s, loss 4.8000 (cls 2.4000, box 2.4000), " \
                           "lr 1.00e-03, about 1m33s left"
    plan.budget = SimpleNamespace(limit_s=30.0)  # a time limit: what is left of it, if that is less
    now[0] += 60
    assert progress.after_step(step(11), epoch=2, spent_s=14.0).endswith("about 16s left")


def test_duration_reads_like_a_clock():
    assert [duration(s) for s in (0, 45, 750, 11100, float("nan"))] == ["0s", "45s", "12m30s", "3h05m", "?"]


def test_bars_only_when_stdout_and_stderr_are_terminals(monkeypatch):
    main, other = os.openpty()
    terminal = os.fdopen(other, "w")
    try:
        monkeypatch.setattr(sys, "stdout", terminal)
        monkeypatch.setattr(sys, "stderr", terminal)
        assert bars_wanted("auto") and not lines_wanted("auto")
        monkeypatch.setattr(sys, "stdout", open(os.devnull, "w"))  # noqa: SIM115 - closed below
        assert not bars_wanted("auto") and lines_wanted("auto")
        assert bars_wanted(True) and not lines_wanted(True)  # true and false keep their meaning
        assert not bars_wanted(False) and not lines_wanted(False)
        sys.stdout.close()
    finally:
        terminal.close()
        os.close(main)


@pytest.mark.parametrize(("override", "message"), [
    ("trainer.progress=sometimes", r"trainer\.progress='sometimes' must be auto, true or false"),
    ("trainer.log_every_seconds=0", r"trainer\.log_every_seconds=0 must be > 0"),
])
def test_bad_progress_settings_are_refused_by_name(override, message):
    from retinanet.config import validate_train_config

    with pytest.raises(ConfigError, match=message):
        validate_train_config(compose_train([override]), allow_auto=True)
