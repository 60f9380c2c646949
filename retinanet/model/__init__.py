"""RetinaNet model: backbone, FPN, heads."""

from retinanet.model.retinanet import RetinaNet, RetinaNetOutput

__all__ = ["RetinaNet", "RetinaNetOutput"]
