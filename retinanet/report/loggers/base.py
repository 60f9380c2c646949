"""The interface every logger backend implements, and how a backend imports its optional package.

The trainer (rank 0 only) calls, in this order: ``log_hparams`` once at the start, ``log_scalars`` every
``trainer.log_every`` steps (``train/loss``, ``train/lr``, ...) and after each evaluation (``val/AP``,
``val/loss``, ...: the epoch's COCO numbers), ``log_evaluation`` after each evaluation (what a backend can
draw of it), ``log_final`` once at the end (the final metrics against the hyperparameters),
``log_artifacts`` with the run's pictures and model card, and ``close`` (also after a crash or a stop).
A backend overrides what it records; the defaults do nothing.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from retinanet.errors import ConfigError


class RunLogger:
    """One destination of a run's numbers (see the module docstring)."""

    name = "logger"

    def log_hparams(self, hparams: dict) -> None:
        """The run's hyperparameters (``{dotted key: number or text}``), at the start."""

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        """Scalars of optimiser step ``step`` (``{tag: value}``)."""

    def log_evaluation(self, key: str, step: int, evaluation, dataset) -> None:
        """An evaluation (``retinanet.evaluation.Evaluation``) of ``dataset`` at ``step``; ``key``: val or
        val_ema. Its COCO numbers come as scalars too."""

    def log_final(self, hparams: dict, metrics: dict[str, float], step: int) -> None:
        """The run's final metrics (``{AP: .., AP50: .., ..., val_loss: ..}``) against its hyperparameters."""

    def log_artifacts(self, paths: list[Path], root: Path) -> None:
        """Files of the run (pictures, model card, metrics.json) to keep with it; ``root``: the run dir (their
        names are relative to it)."""

    def close(self, status: str = "FINISHED") -> None:
        """The run ended: ``FINISHED``, ``FAILED`` (an exception) or ``KILLED`` (a signal)."""


def import_backend(module: str, extra: str, logger: str):
    """``import module``, or a ``ConfigError`` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(f"logger={logger} needs the {module} package ({err}): pip install 'retinanet[{extra}]'") \
            from None


IDS_FILE = "loggers.json"  # in the run dir: each backend's id of this run, so a resumed run continues it


def recall_id(run_dir: Path, backend: str) -> dict | None:
    """What ``remember_id`` kept for ``backend`` in this run dir (None: nothing)."""
    import json

    path = Path(run_dir) / IDS_FILE
    return json.loads(path.read_text()).get(backend) if path.is_file() else None


def remember_id(run_dir: Path, backend: str, value: dict) -> None:
    """Keep ``backend``'s id of this run in ``<run dir>/loggers.json`` (atomically)."""
    import json

    from retinanet.files import atomic_write_json

    path = Path(run_dir) / IDS_FILE
    ids = json.loads(path.read_text()) if path.is_file() else {}
    atomic_write_json({**ids, backend: value}, path)
