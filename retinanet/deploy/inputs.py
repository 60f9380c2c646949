"""Inference inputs: the images and videos named by ``input=`` (files, folders, globs, or a list of them), and the
images as a dataset of ``Collate`` samples.

The detections themselves come from ``retinanet.detector.Detector`` (or its ONNX twin,
``retinanet.deploy.onnx_detector.OnnxDetector``), like everywhere else; ``retinanet.deploy.infer`` runs them.
"""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path

import torch

from retinanet.data.image_io import IMAGE_EXTENSIONS, ImageReadError, load_rgb
from retinanet.deploy.video import VIDEO_EXTENSIONS
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


def _files(spec: str, exclude) -> tuple[list[Path], Path, str]:
    """The files ``spec`` names -> (files sorted, the folder their names are relative to, how to say what it is)."""
    path = Path(spec)
    if path.is_file():
        return [path], path.parent, f"file {spec!r}"
    if path.is_dir():
        root, files = path, sorted(p for p in path.rglob("*") if p.is_file())
        what = f"folder {spec!r}"
    elif glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        root = Path(os.path.commonpath([str(p.parent) for p in files])) if files else Path(".")
        what = f"glob {spec!r}"
    else:
        raise InputError(f"input={spec!r} does not exist (give an image or video file, a folder or a glob)")
    if exclude is not None:
        out = Path(exclude).resolve()
        files = [p for p in files if out not in p.resolve().parents]
    return files, root, what


def find_inputs(specs, exclude: str | os.PathLike | None = None) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]],
                                                                           list[Path]]:
    """Images and videos named by ``specs`` (one spec or a list: files, folders, globs) -> ``(images, videos,
    skipped files)``, images and videos as ``(path, name)``.

    Videos are recognised by extension (``VIDEO_EXTENSIONS``); a file named directly that is not a video is an
    image (decoded by content); in folders and globs, files with neither extension are skipped. Names are
    relative to the folder the inputs share (one folder: relative to it, as ``find_images``), with ``/``. A
    file named twice is taken once; a spec that names nothing raises ``InputError`` naming it.
    """
    specs = [os.fspath(specs)] if isinstance(specs, (str, os.PathLike)) else [os.fspath(s) for s in specs]
    if not specs:
        raise InputError("input=[] names nothing: give an image or video file, a folder or a glob (or a list of them)")
    found, roots = [], []
    for spec in specs:
        files, root, what = _files(spec, exclude)
        if Path(spec).is_file():
            kinds = ["video" if p.suffix.lower() in VIDEO_EXTENSIONS else "image" for p in files]
        else:
            kinds = ["video" if p.suffix.lower() in VIDEO_EXTENSIONS else "image" if p.suffix.lower() in IMAGE_EXTENSIONS
                     else "other" for p in files]
        if all(k == "other" for k in kinds):
            raise InputError(f"input: {what} holds no image file and no video ({len(files)} other files; image "
                             f"extensions: {' '.join(IMAGE_EXTENSIONS)}; video: {' '.join(VIDEO_EXTENSIONS)})")
        found.append(list(zip(files, kinds)))
        roots.append(root.resolve())
    common = Path(os.path.commonpath([str(r) for r in roots]))
    images, videos, skipped, seen = [], [], [], set()
    for files in found:
        for path, kind in files:
            resolved = path.resolve()
            if resolved in seen:
                continue
            seen.add(resolved)
            name = resolved.relative_to(common).as_posix() if common in resolved.parents else path.name
            if kind == "other":
                skipped.append(path)
            else:
                (images if kind == "image" else videos).append((path, name))
    return images, videos, skipped


def find_images(spec: str, exclude: str | os.PathLike | None = None) -> tuple[list[Path], Path, list[Path]]:
    """Images named by ``spec`` -> (image paths sorted, the folder their names are relative to, skipped files).

    ``spec``: an image file (any extension: decoded by content), a folder (searched recursively for
    ``IMAGE_EXTENSIONS``; other files are returned as skipped) or a glob (``photos/**/*.jpg``).
    Files under ``exclude`` (the output folder) are never taken.
    """
    files, root, what = _files(os.fspath(spec), exclude)
    if Path(spec).is_file():
        return files, root, []
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    skipped = [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
    if not images:
        raise InputError(f"input: {what} holds no image file ({len(skipped)} other files; image extensions: "
                         f"{' '.join(IMAGE_EXTENSIONS)})")
    return images, root, skipped
