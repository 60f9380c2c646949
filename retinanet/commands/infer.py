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
skipped with a note. `precision=auto|32|bf16|fp16` (auto: what this device computes best for how the checkpoint was
trained: runtime.inference_dtype).
See retinanet/deploy/infer.py.

Examples:
    retinanet-infer checkpoint=run/best.pt input=photos/ output=photos_detected/
    retinanet-infer checkpoint=run/best.pt input='photos/**/*.jpg' output=out/ postprocess.score_thresh=0.3
    retinanet-infer checkpoint=model.onnx input=[a.jpg,clips/street.mp4] output=out/
"""

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from retinanet.cli import command_line_values, run_or_exit
from retinanet.deploy.infer import infer, load_detector, summary
from retinanet.deploy.inputs import find_inputs
from retinanet.report.progress import bars_wanted


def run(cfg: DictConfig, out_dir, postprocess: dict | None = None) -> dict:
    """Detect on every image and video of ``cfg.input``; returns the detections JSON (also written to out_dir).

    ``postprocess``: settings that replace the checkpoint's (default: those set on the command line).
    """
    specs = [str(v) for v in cfg.input] if OmegaConf.is_list(cfg.input) else str(cfg.input)
    images, videos, skipped = find_inputs(specs, exclude=out_dir)
    post = postprocess if postprocess is not None else command_line_values(cfg, "postprocess")
    detector = load_detector(cfg.checkpoint, cfg.device, cfg.eval_min_size, cfg.eval_max_size, post, cfg.precision)
    result = infer(detector, images, videos, out_dir, skipped=skipped, checkpoint=str(cfg.checkpoint), specs=specs,
                   batch_size=cfg.batch_size, num_workers=cfg.num_workers, render=cfg.render,
                   render_score_thresh=cfg.render_score_thresh, progress=bars_wanted(cfg.progress))
    print(summary(result, out_dir, cfg.render))
    return result


@hydra.main(version_base="1.3", config_path="pkg://retinanet.configs", config_name="infer")
def main(cfg: DictConfig) -> None:
    with torch.inference_mode():
        run_or_exit(run, cfg)


if __name__ == "__main__":
    main()
