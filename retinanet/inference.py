"""Inference inputs: the images named by ``input=`` (files, folders, globs) as a dataset of ``Collate`` samples.

The detections themselves come from ``retinanet.detector.Detector``, like everywhere else.
"""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path

import torch

from retinanet.data.image_io import IMAGE_EXTENSIONS, ImageReadError, load_rgb
from retinanet.detector import image_sample
from retinanet.errors import UserError

log = logging.getLogger(__name__)


class InputError(UserError):
    """The ``input`` of inference names no image."""


class ImageFiles(torch.utils.data.Dataset):
    """Plain image files as ``Collate`` samples (no boxes); ``image_id`` = index in ``paths``.

    An unreadable file gives a ``{"skipped": True}`` marker (dropped by ``SkippingCollate``) and a warning.
    """

    def __init__(self, paths: list, transform):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        try:
            image = load_rgb(self.paths[i])
        except ImageReadError as err:
            log.warning("skipping %s", err)
            return {"skipped": True, "image_id": i}
        return image_sample(self.transform, image, i)


def find_images(spec: str, exclude: str | os.PathLike | None = None) -> tuple[list[Path], Path, list[Path]]:
    """Images named by ``spec`` -> (image paths sorted, the folder their names are relative to, skipped files).

    ``spec``: an image file (any extension: decoded by content), a folder (searched recursively for
    ``IMAGE_EXTENSIONS``; other files are returned as skipped) or a glob (``photos/**/*.jpg``).
    Files under ``exclude`` (the output folder) are never taken.
    """
    spec = os.fspath(spec)
    path = Path(spec)
    if path.is_file():
        return [path], path.parent, []
    if path.is_dir():
        root, files = path, sorted(p for p in path.rglob("*") if p.is_file())
        what = f"folder {spec!r}"
    elif glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        root = Path(os.path.commonpath([str(p.parent) for p in files])) if files else Path(".")
        what = f"glob {spec!r}"
    else:
        raise InputError(f"input={spec!r} does not exist (give an image file, a folder or a glob)")
    if exclude is not None:
        out = Path(exclude).resolve()
        files = [p for p in files if out not in p.resolve().parents]
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    skipped = [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
    if not images:
        raise InputError(f"input: {what} holds no image file ({len(skipped)} other files; image extensions: "
                         f"{' '.join(IMAGE_EXTENSIONS)})")
    return images, root, skipped
