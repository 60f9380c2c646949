"""Where a checkpoint comes from: the versions and git commit of the code, and the data it was trained on.

``collect(name, train_set, val_set)`` is computed once per run (rank 0) and stored in every checkpoint
(``ckpt["provenance"]``) and in the model card beside ``best.pt`` (``retinanet.report.model_card``):

- ``versions``: python, torch, torchvision, numpy, pycocotools and this project (its package metadata;
  None when it runs from a checkout that was never installed);
- ``git``: ``commit`` (``git rev-parse HEAD`` of the repository holding this package) and ``dirty``
  (tracked files changed since that commit); both None when the code is not a git checkout or git is
  not installed: never an error;
- ``data``: the dataset name, the classes, and per split the annotation file, its sha256, the image
  folder and the counts of images, boxes and crowd regions (after the dataset's validation);
- ``created``: when (UTC).
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import logging
import os
import platform
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

CODE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the retinanet package


def versions() -> dict:
    """Versions of the interpreter, the libraries the numbers depend on and this project."""
    import numpy
    import torch
    import torchvision

    def installed(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "torch": str(torch.__version__),  # TorchVersion: not a plain str
            "torchvision": str(torchvision.__version__), "numpy": str(numpy.__version__),
            "pycocotools": installed("pycocotools"), "retinanet": installed("retinanet"),
            "cuda": None if torch.version.cuda is None else str(torch.version.cuda)}


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                              env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
    except (OSError, subprocess.SubprocessError):  # git not installed, not runnable, too slow
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(root: str | Path = CODE_ROOT) -> dict:
    """``{"commit": sha or None, "dirty": bool or None}`` of the git checkout whose top folder is ``root``.

    None (both) when ``root`` is not the top of a git checkout (e.g. the package installed into a
    virtual environment that happens to live inside some repository), or git is missing."""
    root = Path(root).resolve()
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root:
        return {"commit": None, "dirty": None}
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks (a COCO train file is ~450 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def split_facts(dataset) -> dict:
    """One split of the data: annotation file and its sha256, image folder, counts."""
    return {"annotations": str(dataset.ann_file), "sha256": file_sha256(dataset.ann_file),
            "images_dir": str(dataset.img_dir), "images": len(dataset), "boxes": int(dataset.class_counts().sum()),
            "crowd": int(dataset.crowd_count())}


def collect(data_name: str, train_set, val_set) -> dict:
    """The provenance of a training run on ``train_set`` / ``val_set`` (``CocoDetection``s); see the module docstring."""
    data = {"name": str(data_name), "classes": list(train_set.class_names),
            "category_ids": [int(c) for c in train_set.label_to_cat_id],
            "train": split_facts(train_set), "val": split_facts(val_set)}
    return {"versions": versions(), "git": git_state(), "data": data,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
