"""Export a checkpoint for deployment: `retinanet-export checkpoint=<run>/best.pt format=onnx|torchscript|torch_export
graph=raw|end2end output=<file>`.

Writes the model file and a JSON sidecar next to it (`<file>.json`: classes and category ids, the resize,
size_divisible, input / output names and layouts, normalisation (inside the model), post-processing settings),
then (check=true) runs the written file on random images of two other sizes and batch sizes and compares it
with PyTorch. The weights are those `Detector.from_checkpoint` runs: the EMA weights when the run kept an EMA.
See retinanet/deploy/export.py and docs/export_and_inference.md.

Examples:
    retinanet-export checkpoint=outputs/shapes/<date>/best.pt output=model.onnx
    retinanet-export checkpoint=run/best.pt format=onnx graph=raw output=raw.onnx
    retinanet-export checkpoint=run/best.pt format=torch_export output=model.pt2 postprocess.score_thresh=0.3
"""

import json
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from retinanet.cli import command_line_values, run_or_exit
from retinanet.deploy.export import FORMATS, SUFFIXES, ExportError, check_export, export_checkpoint


def run(cfg: DictConfig, out_dir) -> dict:
    """Export ``cfg.checkpoint``; returns the sidecar written next to the model file."""
    fmt, graph = str(cfg.format), str(cfg.graph)
    if fmt not in FORMATS:
        raise ExportError(f"format={fmt!r} must be one of {list(FORMATS)}")
    output = Path(cfg.output) if cfg.output else Path(out_dir) / f"retinanet_{graph}{SUFFIXES[fmt]}"
    start = time.perf_counter()
    detector, meta_path = export_checkpoint(cfg.checkpoint, fmt, graph, output, cfg.eval_min_size, cfg.eval_max_size,
                                            command_line_values(cfg, "postprocess"), str(cfg.weights))
    meta = json.loads(meta_path.read_text())
    print(f"exported {cfg.checkpoint} ({meta['weights']} weights, {len(meta['class_names'])} classes) as {fmt} / {graph} "
          f"-> {output} ({output.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - start:.0f} s); sidecar {meta_path}")
    if cfg.check:
        for row in check_export(detector, fmt, graph, output):
            diffs = ", ".join(f"{k} {v:.2g}" for k, v in row.items() if k != "shape")
            print(f"check: images {row['shape']}: largest |exported - PyTorch|: {diffs}")
    return meta


@hydra.main(version_base="1.3", config_path="pkg://retinanet.configs", config_name="export")
def main(cfg: DictConfig) -> None:
    run_or_exit(run, cfg)


if __name__ == "__main__":
    main()
