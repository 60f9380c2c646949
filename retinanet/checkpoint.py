"""Checkpoints: plain containers, written atomically, loaded with ``weights_only=True``.

Also the pieces of exact resume that are not model state: RNG states as plain containers,
finding the checkpoint to resume from, hard-linked ``best.pt`` / per-epoch copies and their pruning.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from retinanet.errors import UserError

log = logging.getLogger(__name__)


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable or not a checkpoint of this project; the message names the file."""


def _open_temp(fd: int, path: Path):
    """The file object a write of ``path`` goes through (a seam for tests that kill a run mid-write)."""
    return os.fdopen(fd, "wb")


def _atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(fileobj)`` so that a crash at any moment leaves either the old file or the new one.

    The data goes to a temporary file in the same folder, is flushed and fsynced, then
    ``os.replace`` swaps it in (atomic on POSIX and Windows); the folder is fsynced too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with _open_temp(fd, path) as f:
            write(f)
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


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` of plain containers, atomically."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_json(obj, path: str | os.PathLike, indent: int | None = 2) -> None:
    """JSON (UTF-8), atomically; indented for people, ``indent=None`` for bulk data (detections):
    compact, and written by json's C encoder, several times faster."""
    data = json.dumps(obj, indent=indent, allow_nan=True).encode()
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """UTF-8 text, atomically."""
    data = text.encode()
    _atomic_write(path, lambda f: f.write(data))


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint written by this project (plain containers only: ``weights_only=True``).

    Raises ``CheckpointError`` (a ``UserError``: one clear line, exit code 2 at the entry points) for a
    missing, truncated, foreign or unsafe file. Files holding Python objects other than tensors and plain
    containers are refused, never unpickled: loading them could run arbitrary code.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist (give the best.pt or last.pt of a "
                              "training run, e.g. outputs/shapes/<date>/best.pt)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" in str(err):  # a pickled class or function: the blocked part of weights_only
            raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: it holds Python objects other than "
                                  "tensors and plain containers, which are refused because loading them could "
                                  "run code (this project writes plain checkpoints only)") from None
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: not a PyTorch checkpoint, or a "
                              "truncated one") from None
    except Exception as err:  # noqa: BLE001 - any other decoding failure: name the file, not torch's advice
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: not a PyTorch checkpoint, or a truncated "
                              f"one ({type(err).__name__})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a RetinaNet checkpoint of this project (no "
                              "'model' entry)")
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
