"""Case "inference": model + post-processing in eval mode, ours vs torchvision (same architecture and weights).

Ours: a ``Detector`` (the model in ``channels_last``, cached anchors, ``PostProcessor``), as every entry point runs it.
torchvision: ``model.eval()(images)`` (normalise, batch, backbone, head, anchors, postprocess).
``agreement`` compares the raw class logits of both networks on the same images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from benchmarks.models import build_pair, make_batch
from benchmarks.postprocess import SETTINGS
from benchmarks.tv import to_float_list
from retinanet.detector import Detector
from retinanet.postprocess import PostProcessor


@dataclass
class State:
    ours: object
    theirs: object
    run_ours: object
    run_tv: object
    images: torch.Tensor
    arch: dict


def setup(preset: str = "retinanet_r50", batch: int = 2, height: int = 320, width: int = 320, num_classes: int = 80,
          seed: int = 0, device: str = "cpu") -> State:
    device = torch.device(device)
    ours, theirs, anchors, arch = build_pair(preset, num_classes, (height, width), seed)
    ours = ours.eval().to(device, memory_format=torch.channels_last)
    theirs.eval().to(device)
    theirs.detections_per_img = SETTINGS["detections_per_img"]
    detector = Detector(model=ours, anchors=anchors, postprocess=PostProcessor(**SETTINGS),
                        class_names=[str(k) for k in range(num_classes)], category_ids=list(range(num_classes)),
                        min_size=height, max_size=width, size_divisible=32, device=device,
                        channels_last=True)
    data = make_batch(batch, height, width, num_classes, 1, seed)
    tv_images = [im.to(device) for im in to_float_list(data.images)]

    def run_ours():
        return detector.detect_batch(data)[0]

    @torch.no_grad()
    def run_tv():
        return theirs(tv_images)

    return State(ours, theirs, run_ours, run_tv, data.images.to(device), arch)


def contenders(s: State) -> dict:
    return {"ours": s.run_ours, "torchvision": s.run_tv}


@torch.no_grad()
def agreement(s: State) -> dict:
    """Largest difference of the class logits (relative to their range) of the two networks."""
    ours = s.ours(s.images.contiguous(memory_format=torch.channels_last)).cls_logits
    batched, _ = s.theirs.transform(to_float_list(s.images))
    feats = list(s.theirs.backbone(batched.tensors).values())
    theirs = s.theirs.head(feats)["cls_logits"]
    diff = float((ours - theirs).abs().max() / theirs.abs().max().clamp(min=1e-12))
    return {**s.arch, "cls_logits_rel_diff": diff, "same_shape": tuple(ours.shape) == tuple(theirs.shape)}
