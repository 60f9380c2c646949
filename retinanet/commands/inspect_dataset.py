"""Dataset statistics and anchor coverage: `retinanet-inspect data=<preset> [model=<preset>] ...`.

Prints images, boxes per class (with a suggested per-class focal-loss alpha), images without
boxes, the box-size distribution after the training resize and the anchor coverage per size
bucket (share of boxes that get a positive anchor from the matcher, share that reach IoU >=
loss.matcher.fg_iou with some anchor), with hints. Writes inspect.json and samples/*.jpg (images
with their ground truth drawn) into `output` (default: the Hydra run dir). Pass the same overrides
as for training, e.g. model.anchors.sizes=[8,16,32,64,128]: with recipe=auto (experiment=own_data)
the values a training run would fit (resize, anchors, learning rate, run length) come from the same
code (``retinanet.recipe.apply`` on the same device) and are printed with their reasons; the images
are checked as training checks them (``data.verify``).

Examples:
    retinanet-inspect                      # the embedded shapes dataset
    retinanet-inspect experiment=own_data data.train_ann=mine/train.json data.train_images=mine/img
"""

import logging
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from retinanet import recipe
from retinanet.cli import run_or_exit
from retinanet.data.build import build_dataset
from retinanet.data.statistics import anchor_coverage, dataset_statistics, format_report, suggested_alpha
from retinanet.errors import ConfigError
from retinanet.files import atomic_write_json
from retinanet.report.progress import bars_wanted
from retinanet.report.visualize import render_samples
from retinanet.runtime import resolve_device

log = logging.getLogger("inspect")


def run(cfg: DictConfig, out_dir) -> dict:
    """Statistics, anchor coverage and rendered samples of ``cfg.data``'s ``cfg.split``; returns inspect.json."""
    if cfg.split not in ("train", "val"):
        raise ConfigError(f"split={cfg.split!r} must be train or val")
    if cfg.data.generate is not None:
        instantiate(cfg.data.generate)
    # recipe=auto (experiment=own_data): every value training would fit, by the same call on the same device
    choices = recipe.apply(cfg, resolve_device(cfg.device))
    dataset = build_dataset(cfg.data, cfg.split, train=False, progress=cfg.progress)
    stats = dataset_statistics(dataset)
    anchors, matcher = instantiate(cfg.model.anchors), instantiate(cfg.loss.matcher)
    coverage = anchor_coverage(dataset, anchors, matcher, cfg.data.min_size, cfg.data.max_size,
                               cfg.data.size_divisible, cfg.max_images, bars_wanted(cfg.progress))
    alpha = suggested_alpha(dataset)
    print(f"\n{dataset.ann_file}\n" + format_report(stats, coverage, alpha))
    if choices:
        print("\n" + recipe.describe(choices))
    out_dir = Path(out_dir)
    samples = render_samples(dataset, out_dir / "samples", cfg.num_samples)
    report = {"annotations": dataset.ann_file, **stats, "anchor_coverage": coverage, "suggested_alpha": alpha,
              "recipe": {c.key: {"value": c.value, "reason": c.reason} for c in choices},
              "samples": [str(p) for p in samples]}
    atomic_write_json(report, out_dir / "inspect.json")
    print(f"\nwrote {out_dir / 'inspect.json'} and {len(samples)} samples in {out_dir / 'samples'}")
    return report


@hydra.main(version_base="1.3", config_path="pkg://retinanet.configs", config_name="inspect")
def main(cfg: DictConfig) -> None:
    run_or_exit(run, cfg)


if __name__ == "__main__":
    main()
