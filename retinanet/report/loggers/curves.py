"""The loss and learning-rate curves of ``plots/loss_lr.png``, kept whatever the ``logger`` choice.

``CurveRecorder`` is a logger that keeps the scalars of ``retinanet.report.plots.CURVE_TAGS`` in the
trainer's ``TrainState.curves`` (``{"loss": [[step, value], ...], ...}``, checkpointed): the picture shows
exactly the values the loggers got, without reading any logger's files back.
"""

from __future__ import annotations

from retinanet.report.loggers.base import RunLogger
from retinanet.report.plots import CURVE_TAGS


class CurveRecorder(RunLogger):
    name = "curves"

    def __init__(self, curves: dict):
        self.curves = curves

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            if tag in CURVE_TAGS:
                self.curves.setdefault(CURVE_TAGS[tag], []).append([int(step), float(value)])
