"""Case "postprocess": decode, top-k per level, class-wise NMS at COCO scale, untrained-like scores.

Ours: ``PostProcessor`` (top-k batched over images). torchvision: ``RetinaNet.postprocess_detections``
(per image, per level), on the same logits split per level as its ``forward`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.models.detection.retinanet import RetinaNet

from benchmarks.loss import _NoBackbone
from benchmarks.scene import Scene, make_scene
from retinanet.postprocess import PostProcessor

SETTINGS = {"score_thresh": 0.05, "topk_candidates": 1000, "nms_thresh": 0.5, "detections_per_img": 100}


@dataclass
class State:
    scene: Scene
    ours: PostProcessor
    theirs: RetinaNet
    sizes: torch.Tensor


def setup(height: int = 800, width: int = 1216, num_classes: int = 80, images: int = 3, logit_mean: float = -2.0,
          seed: int = 0, device: str = "cpu") -> State:
    scene = make_scene(height, width, num_classes, 0, 0, images, logit_mean=logit_mean, seed=seed).to(device)
    theirs = RetinaNet(_NoBackbone(), num_classes, **SETTINGS).to(device)
    return State(scene, PostProcessor(**SETTINGS), theirs, torch.tensor([[height, width]] * images, device=device))


def contenders(s: State) -> dict:
    sc = s.scene

    def ours():
        return s.ours(sc.cls_logits, sc.box_deltas, sc.anchors, sc.per_level, s.sizes)

    def torchvision():
        head = {"cls_logits": list(sc.cls_logits.split(sc.per_level, dim=1)),
                "bbox_regression": list(sc.box_deltas.split(sc.per_level, dim=1))}
        anchors = [list(sc.anchors.split(sc.per_level))] * len(s.sizes)
        return s.theirs.postprocess_detections(head, anchors, [tuple(hw) for hw in s.sizes.tolist()])

    return {"ours": ours, "torchvision": torchvision}


def agreement(s: State) -> dict:
    """Same detections? Counts, and the largest score / box difference after sorting by score."""
    run = contenders(s)
    ours, theirs = run["ours"](), run["torchvision"]()
    counts, score_diff, box_diff, labels_equal = [], 0.0, 0.0, True
    for a, b in zip(ours, theirs):
        counts.append((len(a["scores"]), len(b["scores"])))
        if len(a["scores"]) != len(b["scores"]):
            continue
        oa, ob = a["scores"].argsort(descending=True), b["scores"].argsort(descending=True)
        if len(oa):
            score_diff = max(score_diff, float((a["scores"][oa] - b["scores"][ob]).abs().max()))
            box_diff = max(box_diff, float((a["boxes"][oa] - b["boxes"][ob]).abs().max()))
            labels_equal &= bool(torch.equal(a["labels"][oa], b["labels"][ob]))
    return {"detections": counts, "same_counts": all(x == y for x, y in counts), "max_score_diff": score_diff,
            "max_box_diff_px": box_diff, "labels_equal": labels_equal,
            "candidates_above_thresh": float((torch.sigmoid(s.scene.cls_logits) > SETTINGS["score_thresh"]).float().mean())}
