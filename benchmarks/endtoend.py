"""Case "endtoend": ``retinanet-infer`` (``retinanet.commands.infer``) over a folder against the model alone on the same images.

A checkpoint of the CPU preset (random weights, class prior 0.1 so that images get detections to
write) is saved under the output folder; ``infer.run`` then decodes, resizes, batches, runs the
model and post-processing and writes ``detections.json``. Model-only: the same model on the same
collated batches, decoded beforehand. Result: end-to-end images/s as a fraction of model-only.
"""

from __future__ import annotations

import importlib
import statistics
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from benchmarks.data import data_config
from benchmarks.models import preset
from retinanet.config import compose_config, load_preset


def _infer_module():
    return importlib.import_module("retinanet.commands.infer")


def make_checkpoint(out: Path, root: Path, preset_name: str = "retinanet_r18_cpu") -> Path:
    from retinanet.data import CocoDetection
    from retinanet.files import atomic_save

    data = data_config(root)
    val = CocoDetection(data.val_ann, data.val_images)
    model_cfg = preset(preset_name)
    model_cfg.net.prior_prob = 0.1
    anchors = instantiate(model_cfg.anchors)
    model = instantiate(model_cfg.net, num_classes=val.num_classes, num_anchors=anchors.num_anchors_per_location)
    post = load_preset("postprocess", "default")
    config = {"model": OmegaConf.to_container(model_cfg, resolve=True),
              "data": OmegaConf.to_container(data, resolve=True), "postprocess": OmegaConf.to_container(post)}
    label_map = {"class_names": list(val.class_names), "category_ids": [int(c) for c in val.label_to_cat_id]}
    path = out / "bench_checkpoint.pt"
    atomic_save({"model": model.state_dict(), "config": config, "label_map": label_map}, path)
    return path


def run(out: Path, root: Path, images: int = 64, batch_size: int = 8, repeats: int = 2) -> dict:
    from retinanet.data.build import build_loader
    from retinanet.deploy.inputs import ImageFiles, find_images
    from retinanet.detector import Detector

    out.mkdir(parents=True, exist_ok=True)
    folder = out / "images"
    folder.mkdir(exist_ok=True)
    sources = sorted(Path(data_config(root).val_images).glob("*.png"))[:images]
    for src in sources:
        target = folder / src.name
        if not target.exists():
            target.write_bytes(src.read_bytes())
    ckpt = make_checkpoint(out, root)
    infer = _infer_module()
    cfg = OmegaConf.merge(compose_config(config_name="infer"),
                          {"checkpoint": str(ckpt), "input": str(folder), "output": str(out / "infer"),
                           "device": "cpu", "render": False, "progress": False, "batch_size": batch_size})

    detector = Detector.from_checkpoint(ckpt, "cpu")
    paths, _, _ = find_images(str(folder))
    loader = build_loader(ImageFiles(paths, detector.transform()), batch_size, False, 0, detector.size_divisible, 0,
                          False)
    batches = list(loader)  # decoded beforehand: model-only sees no decoding

    def model_only():
        with torch.inference_mode():
            for batch in batches:
                detector.model(batch.images)

    def end_to_end():
        with torch.inference_mode():
            return infer.run(cfg, cfg.output)

    model_only()
    result = end_to_end()
    t_model, t_e2e = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model_only()
        t_model.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        end_to_end()
        t_e2e.append(time.perf_counter() - t0)
    n = len(paths)
    model_ips, e2e_ips = n / statistics.median(t_model), n / statistics.median(t_e2e)
    fraction = statistics.median(m / e for m, e in zip(t_model, t_e2e))  # paired rounds, as timing.round_ratio
    return {"images": n, "batch_size": batch_size, "model_only_images_per_s": model_ips,
            "end_to_end_images_per_s": e2e_ips, "fraction": fraction,
            "detections_written": len(result["annotations"]), "model_only_s": t_model, "end_to_end_s": t_e2e}
