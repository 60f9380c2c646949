"""Checkpoints: plain containers, written atomically, loaded with ``weights_only=True``.

Also the pieces of exact resume that are not model state: RNG states as plain containers,
finding the checkpoint to resume from, hard-linked ``best.pt`` / per-epoch copies and their pruning.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from retinanet.errors import UserError

log = logging.getLogger(__name__)

# Test hook: "<file name>:<n>" pauses the n-th write of that file (in this process) once part of the
# data is on disk, creating "<file name>.paused" next to it and waiting while that file exists: lets a
# test kill the process in the middle of a checkpoint write.
PAUSE_ENV = "RETINANET_TEST_PAUSE_WRITE"
_writes: dict[str, int] = {}


def _atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(fileobj)`` so that a crash at any moment leaves either the old file or the new one.

    The data goes to a temporary file in the same folder, is flushed and fsynced, then
    ``os.replace`` swaps it in (atomic on POSIX and Windows); the folder is fsynced too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(_maybe_pausing(f, path))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _maybe_pausing(f, path: Path):
    hook = os.environ.get(PAUSE_ENV)
    if not hook:
        return f
    name, _, nth = hook.rpartition(":")
    if name != path.name:
        return f
    _writes[name] = _writes.get(name, 0) + 1
    return _PausingFile(f, path.with_name(path.name + ".paused")) if _writes[name] == int(nth) else f


class _PausingFile:
    """File wrapper for the ``PAUSE_ENV`` test hook: pauses after its first write reached the disk."""

    def __init__(self, f, marker: Path):
        self.f, self.marker = f, marker

    def write(self, data) -> int:
        n = self.f.write(data)
        if self.marker is not None:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.marker.touch()
            while self.marker.exists():
                time.sleep(0.05)
            self.marker = None
        return n

    def flush(self) -> None:
        self.f.flush()

    def fileno(self) -> int:
        return self.f.fileno()


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` of plain containers, atomically."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_json(obj, path: str | os.PathLike, indent: int | None = 2) -> None:
    """JSON (UTF-8), atomically; indented for people, ``indent=None`` for bulk data (detections):
    compact, and written by json's C encoder, several times faster."""
    data = json.dumps(obj, indent=indent, allow_nan=True).encode()
    _atomic_write(path, lambda f: f.write(data))


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint written by this project (plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - report which file is broken, keep the cause
        raise ValueError(f"checkpoint {str(path)!r} cannot be read ({type(err).__name__}: {err})") from err
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"checkpoint {str(path)!r} is not a RetinaNet checkpoint (no 'model' entry)")
    return ckpt


def atomic_link(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Make ``dst`` a copy of the finished file ``src`` atomically (a hard link where possible: no bytes copied).

    ``src`` is later replaced by ``os.replace`` (a new file), so the link keeps this version.
    """
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:  # no hard links on this file system
        tmp.unlink(missing_ok=True)
        _atomic_write(dst, lambda f: f.write(src.read_bytes()))


def remove_stale_temps(folder: str | os.PathLike) -> list[str]:
    """Delete temporary files left by writes that a killed process never finished; returns their names."""
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        log.info("removed %d unfinished checkpoint write(s) of a killed run: %s", len(stale),
                 ", ".join(p.name for p in stale))
    return [p.name for p in stale]


EPOCH_FILE = re.compile(r"epoch_(\d+)\.pt")


def keep_epoch_copy(last: Path, epoch: int, keep: int) -> None:
    """``epoch_NNNN.pt`` = this epoch's ``last.pt``; only the newest ``keep`` such files stay."""
    if keep <= 0:
        return
    atomic_link(last, last.with_name(f"epoch_{epoch:04d}.pt"))
    found = sorted((int(m.group(1)), p) for p in last.parent.iterdir() if (m := EPOCH_FILE.fullmatch(p.name)))
    for _, p in found[:-keep]:
        p.unlink(missing_ok=True)


def resume_path(resume: str | None, out_dir: Path) -> Path | None:
    """The checkpoint ``trainer.resume`` points to: None (fresh start), ``auto`` (``out_dir/last.pt`` if any)
    or a path (must exist)."""
    if resume in (None, "", "null", "none"):
        return None
    if str(resume) == "auto":
        path = out_dir / "last.pt"
        if path.is_file():
            return path
        log.info("trainer.resume=auto: no %s yet, starting from scratch", path)
        return None
    path = Path(str(resume))
    if not path.is_file():
        raise UserError(f"trainer.resume={str(resume)!r} does not exist; give a checkpoint file (last.pt), "
                        "auto (the run dir's last.pt if any) or null")
    return path


def rng_state() -> dict:
    """Python, numpy and torch (CPU and CUDA) RNG states as plain containers (``weights_only`` loadable)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "words": list(words), "gauss": gauss},
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["words"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
