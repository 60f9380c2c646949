"""``logger=tensorboard`` (the default): event files in ``<run dir>/tensorboard``.

Scalars as scalars; each evaluation's drawn images, PR curves, per-class AP and score histogram
(``retinanet.report.tensorboard.log_eval_visuals``); the hyperparameters against the final metrics in the
HParams tab (``write_hparams``, at the end: the tab needs both); the run's pictures as images
(``pictures/<name>``) and its model card as text (``model_card``), at the last step. A resumed run purges
the events after its checkpoint's step, so its curves continue without a second branch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from retinanet.report.loggers.base import RunLogger
from retinanet.report.tensorboard import log_eval_visuals, write_hparams


class TensorBoardLogger(RunLogger):
    name = "tensorboard"

    def __init__(self, log_dir: str | Path, resumed_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter  # imported late: slow import

        self.writer = SummaryWriter(str(log_dir), purge_step=resumed_step + 1 if resumed_step else None)
        self.step = resumed_step

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.step = step

    def log_evaluation(self, key: str, step: int, evaluation, dataset) -> None:
        log_eval_visuals(self.writer, step, dataset, evaluation.detections, evaluation.image_ids, evaluation.metrics,
                         evaluation.precision, prefix=key)

    def log_final(self, hparams: dict, metrics: dict[str, float], step: int) -> None:
        write_hparams(self.writer, hparams, metrics, step)

    def log_artifacts(self, paths: list[Path], root: Path) -> None:
        from PIL import Image

        for path in paths:
            if path.suffix == ".png":
                with Image.open(path) as im:
                    self.writer.add_image(f"pictures/{path.stem}", np.asarray(im.convert("RGB")), self.step,
                                          dataformats="HWC")
            elif path.name == "model_card.md":
                self.writer.add_text("model_card", path.read_text(), self.step)
        self.writer.flush()

    def close(self, status: str = "FINISHED") -> None:
        self.writer.close()
