"""RetinaNet (ResNet-FPN, sigmoid focal loss): training, evaluation and inference.

The Python API:

    from retinanet import Detector, train
    run = train(overrides=["trainer.epochs=3"])      # as `retinanet-train trainer.epochs=3` (the shapes data)
    print(run.ap, run.run_dir)                       # final validation AP; outputs/shapes/<date>_<time>/
    detector = Detector.from_checkpoint(run.best, device="cpu")
    result = detector.predict("photo.jpg")   # boxes (xyxy, pixels), scores, labels, class_names

``train`` takes the command's overrides (``retinanet.api``: the same config tree, run dir and files; a bad
override raises ``ConfigError``) and returns the run dir, ``best`` / ``last`` checkpoints and final metrics.

Exports are imported lazily: ``import retinanet`` stays cheap (dataset render workers import
``retinanet.data.shapes`` without torch).
"""

from importlib import import_module

_EXPORTS = {"Detector": "detector", "evaluate": "evaluation", "train": "api"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
