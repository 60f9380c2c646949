"""Detections on image files and videos, as ``retinanet-infer`` writes them: JSON, and drawn copies.

``infer(detector, images, videos, out_dir)`` runs any detector with the ``Detector``'s inference interface (a
checkpoint's ``Detector`` or an exported model's ``OnnxDetector``: ``load_detector``) and writes into ``out_dir``:

- ``detections.json`` (COCO style): ``images`` with file names relative to the folder the inputs share,
  ``categories``, ``annotations`` holding every detection (``evaluation.to_coco_results``: category id and name,
  bbox [x, y, w, h] in pixels, score, area), ``videos``, and the files skipped or unreadable;
- ``videos/<name>.json``: the detections of every frame of each video;
- with ``render=True``: ``rendered/<same relative path>`` (images) and ``rendered/<name>.mp4`` (videos) with the
  detections scoring at least ``render_score_thresh`` drawn.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from retinanet.data.build import build_loader
from retinanet.data.image_io import ImageReadError, load_rgb
from retinanet.deploy.inputs import ImageFiles
from retinanet.deploy.video import VideoReadError, VideoWriter, detect_video, video_info
from retinanet.detector import Detector
from retinanet.errors import ConfigError
from retinanet.evaluation import to_coco_results
from retinanet.files import atomic_write_json
from retinanet.report.visualize import draw_detections

log = logging.getLogger(__name__)


def load_detector(checkpoint, device="auto", min_size: int | None = None, max_size: int | None = None,
                  postprocess=None, precision="auto"):
    """What ``checkpoint=`` names, ready to detect: a training checkpoint -> ``Detector`` (computing in ``precision``:
    ``runtime.inference_dtype``), an exported ``.onnx`` model with its sidecar -> ``OnnxDetector`` (fp32)."""
    suffix = Path(str(checkpoint)).suffix.lower()
    if suffix == ".onnx":
        if str(precision) not in ("auto", "32"):
            raise ConfigError(f"precision={precision}: {checkpoint} is an ONNX model exported in fp32; run it with "
                              "precision=32 (or auto), or run the checkpoint for bf16 / fp16")
        from retinanet.deploy.onnx_detector import OnnxDetector

        return OnnxDetector(checkpoint, device, min_size, max_size, postprocess)
    if suffix == ".pt2":
        raise ConfigError(f"checkpoint={checkpoint}: infer runs training checkpoints and ONNX exports (.onnx), not "
                          "torch.export programs (load those with torch.export.load)")
    return Detector.from_checkpoint(checkpoint, device, min_size, max_size, postprocess=postprocess, precision=precision)


def categories(detector) -> list[dict]:
    return [{"id": c, "name": n} for c, n in zip(detector.category_ids, detector.class_names)]


def annotations(det: dict, detector, image_id: int = 0) -> list[dict]:
    """One image's (or frame's) detections as COCO annotations (``image_id``, category, bbox [x, y, w, h], score,
    area)."""
    return to_coco_results([det], [image_id], detector.category_ids, detector.class_names)


def rendered_path(root: Path, rel: Path) -> Path:
    """Where the drawn copy of image ``rel`` goes: its relative path under ``root``, as JPEG or PNG."""
    suffix = rel.suffix.lower() if rel.suffix.lower() in (".jpg", ".jpeg", ".png") else ".png"
    return root / rel.with_suffix(suffix)


def detect_images(detector, images: list[tuple[Path, str]], out_dir: Path, batch_size: int = 8, num_workers: int = 0,
                  render: bool = False, render_score_thresh: float = 0.3, progress: bool = True
                  ) -> tuple[list, list, list]:
    """Detections of ``images`` (``(path, name)``) -> (images entries, annotations, unreadable files); the drawn
    copies with ``render``."""
    paths, names = [p for p, _ in images], [n for _, n in images]
    loader = build_loader(ImageFiles(paths, detector.transform()), batch_size, False, num_workers,
                          detector.size_divisible, 0, detector.device.type == "cuda")
    detections, ids, _ = detector.detect(loader, progress, desc="infer")
    unreadable = sorted(set(range(len(paths))) - set(ids))
    entries, anns = [], []
    for det, i in zip(detections, ids):
        entries.append({"id": i, "file_name": names[i], "width": det["orig_size"][1], "height": det["orig_size"][0]})
        for ann in annotations(det, detector, i):
            anns.append({"id": len(anns) + 1, "image_id": i, "file_name": names[i], **ann})
    if render:
        for det, i in tqdm(list(zip(detections, ids)), desc="render", disable=not progress):
            try:
                image = load_rgb(paths[i])
            except ImageReadError:
                continue
            target = rendered_path(out_dir / "rendered", Path(names[i]))
            target.parent.mkdir(parents=True, exist_ok=True)
            draw_detections(image, det, detector.class_names, render_score_thresh).save(target)
    return entries, anns, [str(paths[i]) for i in unreadable]


def detect_video_file(detector, path: Path, name: str, out_dir: Path, checkpoint: str = "", batch_size: int = 8,
                      render: bool = False, render_score_thresh: float = 0.3, progress: bool = True) -> dict:
    """Detections on every frame of one video: writes videos/<name>.json (and rendered/<name>.mp4); returns its
    entry of detections.json."""
    info = video_info(path)
    rendered = Path("rendered") / Path(name).with_suffix(".mp4")
    writer = VideoWriter(out_dir / rendered, info["fps"]) if render else None
    frames, count = [], 0
    try:
        for index, frame, det in detect_video(detector, path, batch_size, progress, desc=f"video {name}"):
            anns = [{k: v for k, v in ann.items() if k != "image_id"} for ann in annotations(det, detector)]
            count += len(anns)
            frames.append({"frame": index, "time": round(index / info["fps"], 4), "annotations": anns})
            if writer is not None:
                writer.write(np.asarray(draw_detections(frame, det, detector.class_names, render_score_thresh)))
    finally:
        if writer is not None:
            writer.close()
    per_frame = Path("videos") / f"{name}.json"
    atomic_write_json({"checkpoint": checkpoint, "video": str(path), "file_name": name, "fps": info["fps"],
                       "width": info["width"], "height": info["height"], "num_frames": len(frames),
                       "categories": categories(detector), "frames": frames}, out_dir / per_frame, indent=None)
    return {"file_name": name, "num_frames": len(frames), "fps": info["fps"], "width": info["width"],
            "height": info["height"], "detections": count, "detections_file": per_frame.as_posix(),
            "rendered_file": rendered.as_posix() if writer is not None else None}


def infer(detector, images: list[tuple[Path, str]], videos: list[tuple[Path, str]], out_dir, skipped=(),
          checkpoint: str = "", specs=None, batch_size: int = 8, num_workers: int = 0, render: bool = False,
          render_score_thresh: float = 0.3, progress: bool = True) -> dict:
    """Detect on ``images`` and ``videos`` (``(path, name)``, as ``inputs.find_inputs`` gives them) and write the
    outputs (module docstring) into ``out_dir``; returns the content of detections.json. ``skipped``: the files
    ``find_inputs`` left out; ``checkpoint`` and ``specs`` (the ``input`` given) are recorded."""
    out_dir = Path(out_dir)
    if skipped:
        log.info("skipped %d non-image files, e.g. %s", len(skipped), [str(p) for p in skipped[:5]])
    settings = dict(render=render, render_score_thresh=render_score_thresh, progress=progress)
    entries, anns, unreadable = (detect_images(detector, images, out_dir, batch_size, num_workers, **settings)
                                 if images else ([], [], []))
    video_entries = []
    for path, name in videos:
        try:
            video_entries.append(detect_video_file(detector, path, name, out_dir, checkpoint, batch_size, **settings))
        except VideoReadError as err:
            log.warning("skipping %s", err)
            unreadable.append(str(path))
    result = {"checkpoint": checkpoint, "input": specs, "images": entries, "categories": categories(detector),
              "annotations": anns, "videos": video_entries, "skipped_files": [str(p) for p in skipped],
              "unreadable_files": unreadable}
    atomic_write_json(result, out_dir / "detections.json", indent=None)
    return result


def summary(result: dict, out_dir, render: bool = False) -> str:
    """What ``infer`` wrote, for people: counts and paths, one line per video, and the files left out."""
    out_dir = Path(out_dir)
    lines = [f"{len(result['annotations'])} detections on {len(result['images'])} images -> {out_dir / 'detections.json'}"
             + (f", rendered images in {out_dir / 'rendered'}" if render and result["images"] else "")]
    for video in result["videos"]:
        lines.append(f"{video['detections']} detections on {video['num_frames']} frames of {video['file_name']} -> "
                     f"{out_dir / video['detections_file']}"
                     + (f", rendered {out_dir / video['rendered_file']}" if video["rendered_file"] else ""))
    skipped, unreadable = result["skipped_files"], result["unreadable_files"]
    if skipped:
        lines.append(f"note: skipped {len(skipped)} non-image files (e.g. {skipped[0]})")
    if unreadable:
        lines.append(f"note: {len(unreadable)} files could not be read: {unreadable[:5]}")
    return "\n".join(lines)
