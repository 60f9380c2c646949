"""RetinaNet (ResNet-FPN, sigmoid focal loss): training, evaluation and inference.

The Python API:

    from retinanet import Detector
    detector = Detector.from_checkpoint("outputs/shapes/<date>/best.pt", device="cpu")
    result = detector.predict("photo.jpg")   # boxes (xyxy, pixels), scores, labels, class_names

Exports are imported lazily: ``import retinanet`` stays cheap (dataset render workers import
``retinanet.data.shapes`` without torch).
"""

from importlib import import_module

_EXPORTS = {"Detector": "detector", "evaluate": "evaluation", "train": "trainer"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    target = "run" if name == "train" else name
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), target)
