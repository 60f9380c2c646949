"""Checkpoints: plain containers, written atomically, loaded with ``weights_only=True``."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch


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


def atomic_write_json(obj, path: str | os.PathLike) -> None:
    """JSON (indented, UTF-8), atomically."""
    data = json.dumps(obj, indent=2, allow_nan=True).encode()
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
