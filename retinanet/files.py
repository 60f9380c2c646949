"""Atomic file writes: a crash at any moment leaves either the old file or the new one, never half of one.

Each write goes to a temporary file in the same folder (``.<name>.<random>.tmp``), is flushed and fsynced,
then ``os.replace`` swaps it in (atomic on POSIX and Windows) and the folder is fsynced. A process killed
mid-write leaves only its temporary file, which ``remove_stale_temps`` deletes when the run starts again.

No torch at import time: the dataset converters write their JSON through here without loading it
(``atomic_save`` imports torch when called).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def _open_temp(fd: int, path: Path):
    """The file object a write of ``path`` goes through (a seam for tests that kill a run mid-write)."""
    return os.fdopen(fd, "wb")


def _atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(fileobj)`` so that a crash at any moment leaves either the old file or the new one."""
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


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """``data`` as the whole content of ``path``, atomically."""
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """UTF-8 text, atomically."""
    atomic_write_bytes(text.encode(), path)


def atomic_write_json(obj, path: str | os.PathLike, indent: int | None = 2) -> None:
    """JSON (UTF-8), atomically; indented for people, ``indent=None`` for bulk data (detections):
    compact, and written by json's C encoder, several times faster."""
    atomic_write_bytes(json.dumps(obj, indent=indent, allow_nan=True).encode(), path)


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` of plain containers, atomically (checkpoints: ``retinanet.checkpoint``)."""
    import torch  # here, not at the top: see the module docstring

    _atomic_write(path, lambda f: torch.save(obj, f))


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
        atomic_write_bytes(src.read_bytes(), dst)


def remove_stale_temps(folder: str | os.PathLike) -> list[str]:
    """Delete temporary files left by writes that a killed process never finished; returns their names."""
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        log.info("removed %d unfinished write(s) of a killed run: %s", len(stale), ", ".join(p.name for p in stale))
    return [p.name for p in stale]
