"""Case "loss": target assignment + classification and box losses, forward and backward, at COCO scale.

Ours: ``RetinaNetLoss`` (batched chunked matcher, label-based focal loss with analytic backward), set
to torchvision's definition (L1 box loss, per-image normalisation) so the values can be compared.
torchvision: ``RetinaNet.compute_loss`` (``box_iou`` + ``Matcher`` per image, then the head's loss).
Both get the same leaf tensors ``cls_logits [B, A, K]`` / ``box_deltas [B, A, 4]`` and anchors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.detection.retinanet import RetinaNet

from benchmarks.scene import Scene, make_scene
from retinanet.losses import RetinaNetLoss


class _NoBackbone(nn.Module):
    out_channels = 8  # torchvision builds (unused) head convs from this


@dataclass
class State:
    scene: Scene
    cls: torch.Tensor
    box: torch.Tensor
    ours: RetinaNetLoss
    theirs: RetinaNet
    targets: list


def setup(height: int = 800, width: int = 1216, num_classes: int = 80, boxes_per_image: int = 50,
          images_with_boxes: int = 2, empty_images: int = 1, seed: int = 0, device: str = "cpu") -> State:
    scene = make_scene(height, width, num_classes, boxes_per_image, images_with_boxes, empty_images, seed=seed)
    scene = scene.to(device)
    return State(scene, scene.cls_logits.requires_grad_(), scene.box_deltas.requires_grad_(),
                 RetinaNetLoss(num_classes, box_loss="l1", normalization="torchvision"),
                 RetinaNet(_NoBackbone(), num_classes).to(device), scene.targets())


def _grads(s: State) -> tuple[torch.Tensor, torch.Tensor]:
    grads = (s.cls.grad, s.box.grad)
    s.cls.grad = s.box.grad = None
    return grads


def contenders(s: State) -> dict:
    def ours():
        out = s.ours(s.cls, s.box, s.scene.anchors, s.scene.gt_boxes, s.scene.gt_labels)
        out["loss"].backward()
        return {"cls": out["loss_cls"].detach(), "box": out["loss_box"].detach()}, _grads(s)

    def torchvision():
        head_outputs = {"cls_logits": s.cls, "bbox_regression": s.box}
        out = s.theirs.compute_loss(s.targets, head_outputs, [s.scene.anchors] * len(s.targets))
        (out["classification"] + out["bbox_regression"]).backward()
        return {"cls": out["classification"].detach(), "box": out["bbox_regression"].detach()}, _grads(s)

    return {"ours": ours, "torchvision": torchvision}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def agreement(s: State) -> dict:
    """Relative differences of the loss values and gradients (ours vs torchvision)."""
    run = contenders(s)
    (v_ours, g_ours), (v_tv, g_tv) = run["ours"](), run["torchvision"]()
    return {"loss_cls_rel_diff": _rel(v_ours["cls"], v_tv["cls"]), "loss_box_rel_diff": _rel(v_ours["box"], v_tv["box"]),
            "grad_cls_rel_diff": _rel(g_ours[0], g_tv[0]), "grad_box_rel_diff": _rel(g_ours[1], g_tv[1]),
            "anchors": int(s.scene.anchors.shape[0]), "batch": int(s.cls.shape[0])}
