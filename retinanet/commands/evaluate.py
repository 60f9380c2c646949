"""COCO evaluation of a checkpoint: `retinanet-evaluate checkpoint=<run>/best.pt [data=<preset> ...]`.

Prints the 12 COCO numbers and a per-class AP table; writes results.json (COCO results format,
the dataset's category ids), metrics.json and plots/ (PR curves, confusion matrix, drawn images;
evaluation.plots.enabled=false: none) into `output` (default: the Hydra run dir).

Examples:
    retinanet-evaluate checkpoint=outputs/shapes/2026-01-01_12-00-00/best.pt
    retinanet-evaluate checkpoint=run/best.pt data=custom data.val_ann=mine/val.json data.val_images=mine/img
"""

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from retinanet.cli import command_line_values, run_or_exit
from retinanet.config import build, validate_evaluation_config
from retinanet.data.build import build_dataset, build_loader
from retinanet.detector import Detector
from retinanet.errors import ConfigError
from retinanet.evaluation import evaluate, format_metrics, to_coco_results
from retinanet.files import atomic_write_json
from retinanet.report.plots import write_evaluation_plots
from retinanet.report.progress import bars_wanted


def run(cfg: DictConfig, out_dir, postprocess: dict | None = None) -> dict:
    """Evaluate ``cfg.checkpoint`` on ``cfg.data``'s ``cfg.split``; returns the metrics written to metrics.json.

    ``postprocess``: settings that replace the checkpoint's (default: those set on the command line).
    """
    if cfg.split not in ("train", "val"):
        raise ConfigError(f"split={cfg.split!r} must be train or val")
    validate_evaluation_config(cfg)
    post = postprocess if postprocess is not None else command_line_values(cfg, "postprocess")
    detector = Detector.from_checkpoint(cfg.checkpoint, cfg.device, cfg.eval_min_size, cfg.eval_max_size, postprocess=post,
                                        precision=cfg.precision)
    if cfg.data.generate is not None:
        build(cfg.data.generate)
    dataset = build_dataset(cfg.data, cfg.split, train=False, resize=(detector.min_size, detector.max_size))
    cat_ids = detector.dataset_category_ids(dataset)
    batch_size = cfg.batch_size or detector.config.get("trainer", {}).get("eval_batch_size", 8)
    loader = build_loader(dataset, batch_size, False, cfg.num_workers, detector.size_divisible, 0,
                          detector.device.type == "cuda")
    result = evaluate(detector, loader, dataset, progress=bars_wanted(cfg.progress), desc="evaluate", category_ids=cat_ids,
                      backend=cfg.evaluation.backend)
    results = to_coco_results(result.detections, result.image_ids, cat_ids)
    out_dir = Path(out_dir)
    atomic_write_json(results, out_dir / "results.json", indent=None)
    summary = {"checkpoint": str(cfg.checkpoint), "annotations": dataset.ann_file, "skipped_images": dataset.load_skipped,
               "skipped_records": dataset.skipped, **result.metrics}
    atomic_write_json(summary, out_dir / "metrics.json")
    names = dict(zip(cat_ids, detector.class_names))
    print(f"\nCOCO evaluation of {cfg.checkpoint} on {dataset.ann_file} ({len(dataset)} images):\n"
          + format_metrics(result.metrics, names))
    print(f"\nwrote {out_dir / 'results.json'} ({len(results)} detections) and {out_dir / 'metrics.json'}")
    if cfg.evaluation.plots.enabled:
        p = cfg.evaluation.plots
        pictures = write_evaluation_plots(out_dir / "plots", result, dataset, p.score_thresh, p.iou_thresh, p.num_images,
                                          category_ids=cat_ids)
        print(f"pictures: {out_dir / 'plots'} ({', '.join(path.name for path in pictures)})")
    return summary


@hydra.main(version_base="1.3", config_path="pkg://retinanet.configs", config_name="evaluate")
def main(cfg: DictConfig) -> float:
    with torch.inference_mode():
        return run_or_exit(run, cfg)["stats"]["AP"]


if __name__ == "__main__":
    main()
