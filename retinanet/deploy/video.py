"""Video files for inference: frames read with OpenCV (as RGB), detections per frame, a rendered copy (mp4).

``detect_video`` runs any detector with the ``Detector``'s inference interface (``transform``,
``size_divisible``, ``detect_batch``: a checkpoint's ``Detector`` or an ``OnnxDetector``) over the frames in
batches; the frames stream through (a long video is never held in memory).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from retinanet.data.collate import Collate  # noqa: E402
from retinanet.detector import image_sample  # noqa: E402
from retinanet.errors import UserError  # noqa: E402

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
RENDER_FOURCC = "mp4v"  # MPEG-4 part 2: written by the FFmpeg inside opencv-python(-headless) wheels, read everywhere


class VideoReadError(UserError):
    """A video file cannot be opened or decoded; names the file."""


def is_video(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def _open(path: Path) -> cv2.VideoCapture:
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        capture.release()
        raise VideoReadError(f"video {str(path)!r} cannot be opened by OpenCV (missing, not a video, or a codec "
                             "its FFmpeg lacks)")
    return capture


def video_info(path: str | os.PathLike) -> dict:
    """``fps``, ``frames`` (the container's count: an estimate for some formats), ``width``, ``height`` (of the
    frames as ``read_frames`` gives them: OpenCV turns a phone video's frames upright by its rotation metadata,
    and the size is read from the first frame, whatever the OpenCV version reports as the stream's size)."""
    capture = _open(Path(path))
    try:
        fps = float(capture.get(cv2.CAP_PROP_FPS))
        frames = max(0, int(capture.get(cv2.CAP_PROP_FRAME_COUNT)))
        ok, frame = capture.read()
        height, width = frame.shape[:2] if ok else (int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                                                    int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)))
        return {"fps": fps if fps > 0 else 25.0, "frames": frames, "width": int(width), "height": int(height)}
    finally:
        capture.release()


def read_frames(path: str | os.PathLike) -> Iterator[np.ndarray]:
    """Every frame of ``path`` as RGB uint8 ``[H, W, 3]``, in order."""
    capture = _open(Path(path))
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                return
            yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    finally:
        capture.release()


class VideoWriter:
    """RGB frames -> an mp4 file (``RENDER_FOURCC``); the size is taken from the first frame."""

    def __init__(self, path: str | os.PathLike, fps: float):
        self.path, self.fps, self.writer = Path(path), float(fps), None

    def write(self, frame_rgb: np.ndarray) -> None:
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            h, w = frame_rgb.shape[:2]
            self.writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*RENDER_FOURCC), self.fps, (w, h))
            if not self.writer.isOpened():
                raise VideoReadError(f"cannot write video {str(self.path)!r} with codec {RENDER_FOURCC} (OpenCV)")
        self.writer.write(cv2.cvtColor(np.ascontiguousarray(frame_rgb), cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def detect_video(detector, path: str | os.PathLike, batch_size: int = 8, progress: bool = True,
                 desc: str | None = None) -> Iterator[tuple[int, np.ndarray, dict]]:
    """``(frame index, frame RGB, detections in the frame's pixels)`` for every frame of ``path``."""
    path = Path(path)
    transform, collate = detector.transform(), Collate(detector.size_divisible)
    total = video_info(path)["frames"] or None
    bar = tqdm(total=total, desc=desc or path.name, leave=False, disable=not progress, dynamic_ncols=True, unit="frame")
    frames, index = [], 0

    def flush():
        samples = [image_sample(transform, frame, i) for i, frame in enumerate(frames)]
        dets, _ = detector.detect_batch(collate(samples))
        bar.update(len(frames))
        return dets

    try:
        with torch.inference_mode():
            for frame in read_frames(path):
                frames.append(frame)
                if len(frames) == batch_size:
                    for frame_rgb, det in zip(frames, flush()):
                        yield index, frame_rgb, det
                        index += 1
                    frames = []
            if frames:
                for frame_rgb, det in zip(frames, flush()):
                    yield index, frame_rgb, det
                    index += 1
    finally:
        bar.close()
    if index == 0:
        raise VideoReadError(f"video {str(path)!r}: no frame could be decoded")
