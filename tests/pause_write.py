"""Test helper: pause the n-th write of a checkpoint file half-way, so a test can kill the process right there.

In-process: ``install(name, nth)`` replaces ``retinanet.files._open_temp`` (undo with ``uninstall``).
For a training subprocess: ``python tests/pause_write.py last.pt:3 scripts/train.py <overrides...>``.
The paused write creates ``<file name>.paused`` next to the file (part of the data on disk) and waits
while that marker exists.
"""

import os
import runpy
import sys
import time
from pathlib import Path

from retinanet import files

_original = files._open_temp


class PausingFile:
    """A file that pauses after its first write reached the disk, while ``marker`` exists."""

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

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)


def install(name: str, nth: int) -> None:
    writes = {"n": 0}

    def open_temp(fd, path):
        f = _original(fd, path)
        if Path(path).name != name:
            return f
        writes["n"] += 1
        return PausingFile(f, Path(path).with_name(name + ".paused")) if writes["n"] == nth else f

    files._open_temp = open_temp


def uninstall() -> None:
    files._open_temp = _original


if __name__ == "__main__":
    file_name, _, nth = sys.argv[1].rpartition(":")
    install(file_name, int(nth))
    script = sys.argv[2]
    sys.argv = [script, *sys.argv[3:]]
    runpy.run_path(script, run_name="__main__")
