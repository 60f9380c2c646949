"""Detection on images and videos: `retinanet-infer checkpoint=<run>/best.pt input=<inputs> output=<folder>`.

`input` is an image file, a folder (searched recursively), a quoted glob, a video file (mp4, avi, mov, mkv,
webm: by extension) or a list of these: `input=[a.jpg,photos/,'more/**/*.png',clip.mp4]`. `checkpoint` is a
training checkpoint or an exported ONNX model (`model.onnx` with its sidecar `model.onnx.json`, written by
retinanet-export), to check the deployed file on the same inputs.

Writes <output>/detections.json (COCO style: "images" with file names relative to the folder the inputs share,
"categories", and "annotations" holding every detection with its category id and name, bbox [x, y, w, h] in
pixels and score; "videos" lists the videos) and, with render=true, <output>/rendered/<same relative path>
with the detections above render_score_thresh drawn. Each video gets <output>/videos/<name>.json (detections per
frame) and, with render=true, a rendered copy <output>/rendered/<name>.mp4. Non-image files in folders are
skipped with a note. `precision=32|bf16|fp16` (auto: the checkpoint's own) where the device computes it natively.

Examples:
    retinanet-infer checkpoint=run/best.pt input=photos/ output=photos_detected/
    retinanet-infer checkpoint=run/best.pt input='photos/**/*.jpg' output=out/ postprocess.score_thresh=0.3
    retinanet-infer checkpoint=model.onnx input=[a.jpg,clips/street.mp4] output=out/
"""

import logging
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from tqdm import tqdm

from retinanet.cli import command_line_values, run_or_exit
from retinanet.data.build import build_loader
from retinanet.data.image_io import ImageReadError, load_rgb
from retinanet.deploy.inputs import ImageFiles, find_inputs, load_detector
from retinanet.deploy.video import VideoReadError, VideoWriter, detect_video, video_info
from retinanet.files import atomic_write_json
from retinanet.report.visualize import draw_detections

log = logging.getLogger("infer")


def _rendered_path(root: Path, rel: Path) -> Path:
    suffix = rel.suffix.lower() if rel.suffix.lower() in (".jpg", ".jpeg", ".png") else ".png"
    return root / rel.with_suffix(suffix)


def _annotations(det: dict, detector, **extra) -> list[dict]:
    """One image's (or frame's) detections as COCO-style annotations (bbox [x, y, w, h] pixels)."""
    anns = []
    for box, score, label in zip(det["boxes"].double().tolist(), det["scores"].tolist(), det["labels"].tolist()):
        x1, y1, x2, y2 = box
        anns.append({**extra, "category_id": detector.category_ids[label], "category_name": detector.class_names[label],
                     "bbox": [round(v, 2) for v in (x1, y1, x2 - x1, y2 - y1)], "score": round(score, 5),
                     "area": round((x2 - x1) * (y2 - y1), 2), "iscrowd": 0})
    return anns


def _detect_images(cfg, detector, images, out_dir: Path) -> tuple[list, list, list]:
    """Detections of the images -> (images entries, annotations, unreadable files)."""
    paths, names = [p for p, _ in images], [n for _, n in images]
    loader = build_loader(ImageFiles(paths, detector.transform()), cfg.batch_size, False, cfg.num_workers,
                          detector.size_divisible, 0, detector.device.type == "cuda")
    detections, ids, _ = detector.detect(loader, cfg.progress, desc="infer")
    unreadable = sorted(set(range(len(paths))) - set(ids))
    entries, anns = [], []
    for det, i in zip(detections, ids):
        entries.append({"id": i, "file_name": names[i], "width": det["orig_size"][1], "height": det["orig_size"][0]})
        for ann in _annotations(det, detector, image_id=i, file_name=names[i]):
            anns.append({"id": len(anns) + 1, **ann})
    if cfg.render:
        for det, i in tqdm(list(zip(detections, ids)), desc="render", disable=not cfg.progress):
            try:
                image = load_rgb(paths[i])
            except ImageReadError:
                continue
            target = _rendered_path(out_dir / "rendered", Path(names[i]))
            target.parent.mkdir(parents=True, exist_ok=True)
            draw_detections(image, det, detector.class_names, cfg.render_score_thresh).save(target)
    return entries, anns, [str(paths[i]) for i in unreadable]


def _detect_video(cfg, detector, path: Path, name: str, out_dir: Path) -> dict:
    """Detections on every frame of one video: writes videos/<name>.json (and rendered/<name>.mp4)."""
    info = video_info(path)
    rendered = Path("rendered") / Path(name).with_suffix(".mp4")
    writer = VideoWriter(out_dir / rendered, info["fps"]) if cfg.render else None
    frames, count = [], 0
    try:
        for index, frame, det in detect_video(detector, path, cfg.batch_size, cfg.progress, desc=f"video {name}"):
            anns = _annotations(det, detector)
            count += len(anns)
            frames.append({"frame": index, "time": round(index / info["fps"], 4), "annotations": anns})
            if writer is not None:
                writer.write(np.asarray(draw_detections(frame, det, detector.class_names, cfg.render_score_thresh)))
    finally:
        if writer is not None:
            writer.close()
    per_frame = Path("videos") / f"{name}.json"
    atomic_write_json({"checkpoint": str(cfg.checkpoint), "video": str(path), "file_name": name, "fps": info["fps"],
                       "width": info["width"], "height": info["height"], "num_frames": len(frames),
                       "categories": [{"id": c, "name": n} for c, n in zip(detector.category_ids, detector.class_names)],
                       "frames": frames}, out_dir / per_frame, indent=None)
    return {"file_name": name, "num_frames": len(frames), "fps": info["fps"], "width": info["width"],
            "height": info["height"], "detections": count, "detections_file": per_frame.as_posix(),
            "rendered_file": rendered.as_posix() if writer is not None else None}


def _input_specs(value) -> str | list[str]:
    if isinstance(value, (ListConfig, list, tuple)):
        return [str(v) for v in (OmegaConf.to_container(value) if isinstance(value, ListConfig) else value)]
    return str(value)


def run(cfg: DictConfig, out_dir, postprocess: dict | None = None) -> dict:
    """Detect on every image and video of ``cfg.input``; returns the detections JSON (also written to out_dir).

    ``postprocess``: settings that replace the checkpoint's (default: those set on the command line).
    """
    out_dir = Path(out_dir)
    specs = _input_specs(cfg.input)
    images, videos, others = find_inputs(specs, exclude=out_dir)
    post = postprocess if postprocess is not None else command_line_values(cfg, "postprocess")
    detector = load_detector(cfg.checkpoint, cfg.device, cfg.min_size, cfg.max_size, post, cfg.precision)
    if others:
        log.info("skipped %d non-image files, e.g. %s", len(others), [str(p) for p in others[:5]])
    entries, anns, unreadable = _detect_images(cfg, detector, images, out_dir) if images else ([], [], [])
    video_entries = []
    for path, name in videos:
        try:
            video_entries.append(_detect_video(cfg, detector, path, name, out_dir))
        except VideoReadError as err:
            log.warning("skipping %s", err)
            unreadable.append(str(path))
    result = {"checkpoint": str(cfg.checkpoint), "input": specs, "images": entries,
              "categories": [{"id": c, "name": n} for c, n in zip(detector.category_ids, detector.class_names)],
              "annotations": anns, "videos": video_entries, "skipped_files": [str(p) for p in others],
              "unreadable_files": unreadable}
    atomic_write_json(result, out_dir / "detections.json", indent=None)
    print(f"{len(anns)} detections on {len(entries)} images -> {out_dir / 'detections.json'}"
          + (f", rendered images in {out_dir / 'rendered'}" if cfg.render and entries else ""))
    for video in video_entries:
        print(f"{video['detections']} detections on {video['num_frames']} frames of {video['file_name']} -> "
              f"{out_dir / video['detections_file']}"
              + (f", rendered {out_dir / video['rendered_file']}" if video["rendered_file"] else ""))
    if others:
        print(f"note: skipped {len(others)} non-image files (e.g. {others[0]})")
    if unreadable:
        print(f"note: {len(unreadable)} files could not be read: {unreadable[:5]}")
    return result


@hydra.main(version_base="1.3", config_path="pkg://retinanet.configs", config_name="infer")
def main(cfg: DictConfig) -> None:
    with torch.inference_mode():
        run_or_exit(run, cfg)


if __name__ == "__main__":
    main()
