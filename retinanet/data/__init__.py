"""Data pipeline: COCO-format datasets, the synthetic shapes dataset, transforms and collate.

Exports are imported lazily, so ``retinanet.data.shapes`` (used by dataset generation
workers) loads without torch or albumentations.
"""

from importlib import import_module

_EXPORTS = {
    "CocoDetection": "coco", "DatasetError": "coco",
    "Batch": "collate", "Collate": "collate",
    "ImageReadError": "image_io", "load_rgb": "image_io",
    "ensure_shapes_dataset": "shapes",
    "DetectionTransform": "transforms", "build_transforms": "transforms",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
