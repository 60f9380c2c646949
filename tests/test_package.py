"""The project as a package: the wheel holds the code and the Hydra config tree, and its console commands
train, infer and evaluate from a folder outside the clone.

The wheel is built from a copy of the source (no ``build/`` left in the clone, no stale files in the wheel)
with the setuptools already installed (``--no-build-isolation``: nothing downloaded). It is installed with
``--no-deps`` into a fresh virtual environment whose only link to this one is a ``.pth`` line naming this
interpreter's site-packages (the dependencies: torch, hydra, ...). A plain path line does not run the ``.pth``
files of that folder, so an editable install of the project there is not seen: ``retinanet`` is the wheel's.
"""

import json
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, tiny_train_overrides

# what a source copy leaves out: at the top, virtual environments, data, run outputs, earlier builds, the parts
# not packaged; anywhere, caches
TOP_IGNORED = {".git", ".venv", "data", "outputs", "multirun", "runs", "build", "dist", "tests", "benchmarks", "docs"}
CACHES = shutil.ignore_patterns("__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache")


def _ignore(folder: str, names: list[str]) -> set[str]:
    top = TOP_IGNORED if Path(folder).resolve() == ROOT else set()
    return CACHES(folder, names) | (top & set(names))


COMMANDS = ("retinanet-train", "retinanet-evaluate", "retinanet-infer", "retinanet-inspect", "retinanet-export",
            "retinanet-convert")
MAP_LINE = re.compile(r"AP @\[IoU=0\.50:0\.95 \| area=all \| maxDets=100\] = (\S+)\s+\(AP\)")


def _run(args, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(NO_ALBUMENTATIONS_UPDATE="1", PYTHONUNBUFFERED="1", PYTHONNOUSERSITE="1")
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[0]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _build_wheel(tmp: Path) -> Path:
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_ignore, symlinks=True)
    wheels = tmp / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", wheels,
          src], cwd=tmp)
    (wheel,) = wheels.glob("retinanet-*.whl")
    return wheel


def _fresh_venv(tmp: Path) -> Path:
    """A virtual environment seeing this interpreter's packages through a .pth path line; returns its bin/."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib"), *site.getsitepackages()}
    Path(purelib, "_outer_site_packages.pth").write_text("".join(f"{p}\n" for p in sorted(ours) if Path(p).is_dir()))
    return venv / "bin"


@pytest.mark.slow
def test_wheel_installs_and_its_commands_train_infer_evaluate(tiny_shapes, tmp_path):
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    for name in ("retinanet/configs/__init__.py", "retinanet/configs/train.yaml", "retinanet/configs/infer.yaml",
                 "retinanet/configs/model/retinanet_r18_cpu.yaml", "retinanet/configs/sweep/demo.yaml",
                 "retinanet/commands/train.py"):
        assert name in names, f"{name} missing from {wheel.name}"
    for command in COMMANDS:
        assert f"{command} = retinanet.commands." in entry_points

    bin_dir = _fresh_venv(tmp_path)
    python = bin_dir / "python"
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", wheel], cwd=tmp_path)
    for command in COMMANDS:
        assert (bin_dir / command).exists(), f"{command} not installed"

    work = tmp_path / "elsewhere"  # a folder outside the clone: no configs/, no scripts/
    work.mkdir()
    where = _run([python, "-c", "import retinanet, retinanet.config as c; print(retinanet.__file__); print(c.CONFIGS)"],
                 cwd=work).stdout.split()
    venv = bin_dir.parent.resolve()
    assert Path(where[0]).resolve().is_relative_to(venv), f"retinanet imported from {where[0]}, not the wheel"
    assert Path(where[1]).resolve().is_relative_to(venv) and (Path(where[1]) / "train.yaml").is_file()

    # train: Hydra key=value overrides, the config tree from the package
    run_dir = work / "run"
    proc = _run([bin_dir / "retinanet-train", *tiny_train_overrides(tiny_shapes, out_epochs=1), "data.generate=null",
                 f"hydra.run.dir={run_dir}"], cwd=work)
    assert MAP_LINE.search(proc.stdout), proc.stdout[-2000:]
    for name in ("best.pt", "last.pt", "metrics.json", ".hydra/config.yaml"):
        assert (run_dir / name).is_file(), f"training wrote no {name}"
    assert (run_dir / ".hydra" / "overrides.yaml").read_text().count("trainer.epochs=1") == 1

    # infer on two validation images with the checkpoint it wrote
    images = sorted((tiny_shapes / "val").iterdir())[:2]
    out = work / "detected"
    proc = _run([bin_dir / "retinanet-infer", f"checkpoint={run_dir / 'last.pt'}", f"input=[{images[0]},{images[1]}]",
                 f"output={out}", "render=true", "progress=false", "postprocess.score_thresh=0.001"], cwd=work)
    detections = json.loads((out / "detections.json").read_text())
    assert sorted(i["file_name"] for i in detections["images"]) == sorted(p.name for p in images)
    assert {c["name"] for c in detections["categories"]} and detections["annotations"], "no detections at score 0.001"
    assert len(list((out / "rendered").iterdir())) == 2
    assert "-> " in proc.stdout and "detections.json" in proc.stdout

    # evaluate the best checkpoint on the validation split: the COCO numbers printed and written
    eval_dir = work / "evaluated"
    proc = _run([bin_dir / "retinanet-evaluate", f"checkpoint={run_dir / 'best.pt'}", f"data.root={tiny_shapes}",
                 "data.generate=null", "progress=false", "batch_size=8", "evaluation.plots.enabled=false",
                 f"output={eval_dir}", f"hydra.run.dir={work / 'eval_run'}"], cwd=work)
    found = MAP_LINE.search(proc.stdout)
    assert found, proc.stdout[-2000:]
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert found.group(1) == "n/a" or float(found.group(1)) == pytest.approx(metrics["stats"]["AP"], abs=6e-4)
    assert (eval_dir / "results.json").is_file()

    # the argparse command answers too
    assert "--format" in _run([bin_dir / "retinanet-convert", "--help"], cwd=work).stdout


def test_console_commands_resolve_and_compose_from_the_package_configs():
    """Every [project.scripts] entry names a callable; each Hydra command's config composes from
    pkg://retinanet.configs (no repository path involved)."""
    import importlib

    from hydra import compose, initialize_config_module

    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == set(COMMANDS)
    for command, target in scripts.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), command
    with initialize_config_module(config_module="retinanet.configs", version_base="1.3"):
        for name, key in (("train", "trainer"), ("evaluate", "split"), ("infer", "render"),
                          ("inspect", "max_images"), ("export", "format")):
            assert key in compose(config_name=name), name
