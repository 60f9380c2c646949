"""COCO evaluation of a checkpoint: `python scripts/evaluate.py checkpoint=<run>/best.pt [data=<preset> ...]`.

Prints the 12 COCO numbers and a per-class AP table; writes results.json (COCO results format,
the dataset's category ids) and metrics.json into `output` (default: the Hydra run dir).

Examples:
    python scripts/evaluate.py checkpoint=outputs/shapes/2026-01-01_12-00-00/best.pt
    python scripts/evaluate.py checkpoint=run/best.pt data=custom data.val_ann=mine/val.json data.val_images=mine/img
"""

import logging
import sys
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from retinanet.cli import run_or_exit  # noqa: E402
from retinanet.checkpoint import atomic_write_json  # noqa: E402
from retinanet.data.build import build_dataset, build_loader  # noqa: E402
from retinanet.errors import ConfigError  # noqa: E402
from retinanet.evaluation import coco_evaluate, format_metrics, to_coco_results  # noqa: E402
from retinanet.inference import dataset_category_ids, detect, load_detector  # noqa: E402

log = logging.getLogger("evaluate")


def run(cfg: DictConfig, out_dir) -> dict:
    """Evaluate ``cfg.checkpoint`` on ``cfg.data``'s ``cfg.split``; returns the metrics written to metrics.json."""
    if cfg.split not in ("train", "val"):
        raise ConfigError(f"split={cfg.split!r} must be train or val")
    detector = load_detector(cfg.checkpoint, cfg.device, cfg.min_size, cfg.max_size, score_thresh=cfg.score_thresh,
                             nms_thresh=cfg.nms_thresh, detections_per_img=cfg.detections_per_img)
    if cfg.data.generate is not None:
        instantiate(cfg.data.generate)
    dataset = build_dataset(cfg.data, cfg.split, train=False, resize=(detector.min_size, detector.max_size))
    cat_ids = dataset_category_ids(detector, dataset)
    loader = build_loader(dataset, cfg.batch_size, False, cfg.num_workers, detector.size_divisible, 0,
                          detector.device.type == "cuda")
    detections, image_ids = detect(detector, loader, cfg.progress, desc="evaluate")
    results = to_coco_results(detections, image_ids, cat_ids)
    metrics = coco_evaluate(dataset.coco, [dict(r) for r in results], image_ids)  # loadRes adds keys in place
    out_dir = Path(out_dir)
    atomic_write_json(results, out_dir / "results.json", indent=None)
    summary = {"checkpoint": str(cfg.checkpoint), "annotations": dataset.ann_file, "images": len(image_ids),
               "skipped_images": dataset.load_skipped, "skipped_records": dataset.skipped,
               "num_detections": len(results), **metrics}
    atomic_write_json(summary, out_dir / "metrics.json")
    names = dict(zip(dataset.label_to_cat_id, dataset.class_names))
    print(f"\nCOCO evaluation of {cfg.checkpoint} on {dataset.ann_file} ({len(image_ids)} images):\n"
          + format_metrics(metrics, names))
    print(f"\nwrote {out_dir / 'results.json'} ({len(results)} detections) and {out_dir / 'metrics.json'}")
    return summary


@hydra.main(version_base="1.3", config_path="../configs", config_name="evaluate")
def main(cfg: DictConfig) -> float:
    with torch.inference_mode():
        return run_or_exit(run, cfg)["stats"]["AP"]


if __name__ == "__main__":
    main()
