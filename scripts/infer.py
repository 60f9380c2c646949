"""Detection on a folder of images: `python scripts/infer.py checkpoint=<run>/best.pt input=<folder|file|glob>
output=<folder>`.

Writes <output>/detections.json (COCO style: "images" with file names relative to the input folder,
"categories", and "annotations" holding every detection with its category id and name, bbox
[x, y, w, h] in pixels and score) and, with render=true, <output>/rendered/<same relative path>
with the detections above render_score_thresh drawn. Non-image files are skipped with a note.

Examples:
    python scripts/infer.py checkpoint=run/best.pt input=photos/ output=photos_detected/
    python scripts/infer.py checkpoint=run/best.pt input='photos/**/*.jpg' output=out/ postprocess.score_thresh=0.3
"""

import logging
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from retinanet.checkpoint import atomic_write_json  # noqa: E402
from retinanet.cli import command_line_values, run_or_exit  # noqa: E402
from retinanet.data.build import build_loader  # noqa: E402
from retinanet.data.image_io import ImageReadError, load_rgb  # noqa: E402
from retinanet.detector import Detector  # noqa: E402
from retinanet.inference import ImageFiles, find_images  # noqa: E402
from retinanet.visualize import draw_detections  # noqa: E402

log = logging.getLogger("infer")


def _rendered_path(root: Path, rel: Path) -> Path:
    suffix = rel.suffix.lower() if rel.suffix.lower() in (".jpg", ".jpeg", ".png") else ".png"
    return root / rel.with_suffix(suffix)


def run(cfg: DictConfig, out_dir, postprocess: dict | None = None) -> dict:
    """Detect on every image of ``cfg.input``; returns the detections JSON (also written to out_dir).

    ``postprocess``: settings that replace the checkpoint's (default: those set on the command line).
    """
    out_dir = Path(out_dir)
    paths, root, others = find_images(str(cfg.input), exclude=out_dir)
    post = postprocess if postprocess is not None else command_line_values(cfg, "postprocess")
    detector = Detector.from_checkpoint(cfg.checkpoint, cfg.device, cfg.min_size, cfg.max_size, postprocess=post)
    if others:
        log.info("skipped %d non-image files, e.g. %s", len(others), [str(p) for p in others[:5]])
    names = [p.relative_to(root).as_posix() if root in p.parents else p.name for p in paths]
    loader = build_loader(ImageFiles(paths, detector.transform()), cfg.batch_size, False, cfg.num_workers,
                          detector.size_divisible, 0, detector.device.type == "cuda")
    detections, ids, _ = detector.detect(loader, cfg.progress, desc="infer")
    unreadable = sorted(set(range(len(paths))) - set(ids))
    images, anns = [], []
    for det, i in zip(detections, ids):
        images.append({"id": i, "file_name": names[i], "width": det["orig_size"][1], "height": det["orig_size"][0]})
        boxes = det["boxes"].double()
        for box, score, label in zip(boxes.tolist(), det["scores"].tolist(), det["labels"].tolist()):
            x1, y1, x2, y2 = box
            anns.append({"id": len(anns) + 1, "image_id": i, "file_name": names[i],
                         "category_id": detector.category_ids[label], "category_name": detector.class_names[label],
                         "bbox": [round(v, 2) for v in (x1, y1, x2 - x1, y2 - y1)], "score": round(score, 5),
                         "area": round((x2 - x1) * (y2 - y1), 2), "iscrowd": 0})
    if cfg.render:
        for det, i in tqdm(list(zip(detections, ids)), desc="render", disable=not cfg.progress):
            try:
                image = load_rgb(paths[i])
            except ImageReadError:
                continue
            target = _rendered_path(out_dir / "rendered", Path(names[i]))
            target.parent.mkdir(parents=True, exist_ok=True)
            draw_detections(image, det, detector.class_names, cfg.render_score_thresh).save(target)
    result = {"checkpoint": str(cfg.checkpoint), "input": str(cfg.input), "images": images,
              "categories": [{"id": c, "name": n} for c, n in zip(detector.category_ids, detector.class_names)],
              "annotations": anns, "skipped_files": [str(p) for p in others],
              "unreadable_files": [str(paths[i]) for i in unreadable]}
    atomic_write_json(result, out_dir / "detections.json", indent=None)
    print(f"{len(anns)} detections on {len(images)} images -> {out_dir / 'detections.json'}"
          + (f", rendered images in {out_dir / 'rendered'}" if cfg.render else ""))
    if others:
        print(f"note: skipped {len(others)} non-image files (e.g. {others[0]})")
    if unreadable:
        print(f"note: {len(unreadable)} images could not be read: {[str(paths[i]) for i in unreadable[:5]]}")
    return result


@hydra.main(version_base="1.3", config_path="../configs", config_name="infer")
def main(cfg: DictConfig) -> None:
    with torch.inference_mode():
        run_or_exit(run, cfg)


if __name__ == "__main__":
    main()
