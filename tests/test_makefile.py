"""The Makefile's two installs: `make train` installs the project alone, `make test` the project with `.[dev]`, each
once per pyproject.toml. Run against a copy of the Makefile with a stand-in Python that records its calls."""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# a stand-in for python3 and for .venv/bin/python: `-m venv DIR` makes DIR/bin/python (itself); every other call
# is appended to calls.log and succeeds
FAKE_PYTHON = """#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && echo "venv" >> "$CALLS"; exit 0
fi
echo "$*" >> "$CALLS"
"""

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


@pytest.fixture
def clone(tmp_path):
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    return tmp_path


def make(clone: Path, target: str) -> list[str]:
    """The calls ``make <target>`` made of Python, in order."""
    calls = clone / "calls.log"
    calls.unlink(missing_ok=True)
    subprocess.run(["make", "-s", target, f"PYTHON={clone / 'fake_python'}"], cwd=clone, check=True,
                   env={**os.environ, "CALLS": str(calls)}, capture_output=True)
    # stamps and pyproject.toml must not share a timestamp (the kernel's file clock ticks every few ms), whether
    # pyproject.toml is touched next or another make run follows
    time.sleep(0.05)
    return calls.read_text().splitlines() if calls.exists() else []


def installs(calls: list[str]) -> list[str]:
    return [c.split(" -e ", 1)[1] for c in calls if c.startswith("-m pip install")]


def test_make_train_installs_the_project_alone_then_make_test_adds_dev(clone):
    first = make(clone, "train")
    assert first[0] == "venv" and installs(first) == ["."] and first[-1] == "scripts/train.py"
    assert installs(make(clone, "train")) == []           # once per pyproject.toml
    assert installs(make(clone, "test-fast")) == ['.[dev]']  # the test tools on top
    assert installs(make(clone, "test")) == []
    assert installs(make(clone, "train")) == []           # .[dev] holds what training needs


def test_make_test_first_serves_make_train_and_a_changed_pyproject_installs_again(clone):
    first = make(clone, "test")
    assert first[0] == "venv" and installs(first) == [".[dev]"]
    assert installs(make(clone, "train")) == []
    (clone / "pyproject.toml").touch()
    assert installs(make(clone, "train")) == ["."]
    assert installs(make(clone, "test")) == [".[dev]"]
    (clone / "pyproject.toml").touch()
    assert installs(make(clone, "test")) == [".[dev]"]
    assert installs(make(clone, "train")) == []
