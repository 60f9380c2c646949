"""The loggers of a run, opened from the ``logger`` config group, and the one object the trainer writes to.

``logger=tensorboard`` (the default), ``csv``, ``mlflow``, ``wandb``, several at once
(``logger=[tensorboard,mlflow]``: each preset sets its flag, ``logger.<backend>: true``, and its own keys)
or none (``logger=[]``). Rank 0 alone logs: on the other ranks the group is empty. Whatever the choice, the
group also keeps the loss and learning-rate curves the run's pictures are drawn from (``CurveRecorder``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from retinanet import distributed
from retinanet.errors import ConfigError
from retinanet.report.hparams import final_metrics, hparams_of
from retinanet.report.loggers.base import RunLogger
from retinanet.report.loggers.curves import CurveRecorder

log = logging.getLogger(__name__)
BACKENDS = ("tensorboard", "csv", "mlflow", "wandb")


class LoggerGroup:
    """Every call goes to each logger, in order (an error of one stops the run: its files are then still
    complete up to the last checkpoint); ``close`` closes them all, whatever fails."""

    def __init__(self, loggers: list[RunLogger], hparams: dict | None = None):
        self.loggers, self.hparams = list(loggers), dict(hparams or {})

    @property
    def names(self) -> list[str]:
        return [lg.name for lg in self.loggers]

    def start(self) -> None:
        for lg in self.loggers:
            lg.log_hparams(self.hparams)

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        for lg in self.loggers:
            lg.log_scalars(scalars, step)

    def log_evaluation(self, key: str, step: int, evaluation, dataset, epoch: int) -> None:
        """The evaluation's COCO numbers and validation losses as ``<key>/<name>`` scalars (with the ``epoch``),
        then what each backend draws of it."""
        metrics = evaluation.metrics
        scalars = {f"{key}/{k}": v for k, v in {**metrics["stats"], **metrics["loss"]}.items() if v is not None}
        self.log_scalars({**scalars, "epoch": epoch}, step)
        for lg in self.loggers:
            lg.log_evaluation(key, step, evaluation, dataset)

    def log_final(self, metrics: dict | None, step: int) -> None:
        """The final ``evaluate`` result's numbers (``retinanet.report.hparams.final_metrics``)."""
        final = final_metrics(metrics)
        for lg in self.loggers:
            lg.log_final(self.hparams, final, step)

    def log_artifacts(self, paths: list[Path], root: Path) -> None:
        paths = [Path(p) for p in paths if Path(p).is_file()]
        for lg in self.loggers:
            lg.log_artifacts(paths, Path(root))

    def close(self, status: str = "FINISHED") -> None:
        """Close every logger; one that fails is logged (the run's own files are complete by then)."""
        for lg in self.loggers:
            try:
                lg.close(status)
            except Exception as err:  # noqa: BLE001 - every logger gets closed, whatever one of them raises
                log.warning("logger %s did not close cleanly: %s: %s", lg.name, type(err).__name__, err)


def chosen_backends(cfg: DictConfig) -> list[str]:
    """The backends the ``logger`` group turns on, in ``BACKENDS`` order."""
    node = cfg.get("logger") or {}
    for name in BACKENDS:
        if name in node and not isinstance(node[name], bool):
            raise ConfigError(f"logger.{name}={node[name]!r} must be true or false")
    return [name for name in BACKENDS if node.get(name) is True]


def open_loggers(cfg: DictConfig, run_dir: Path, curves: dict, resumed_step: int = 0) -> LoggerGroup:
    """Rank 0: the curves and the chosen backends, started (the hyperparameters logged); other ranks: none.
    ``curves``: the run's ``TrainState.curves``; ``resumed_step``: the step a resumed run continues from."""
    if not distributed.info().is_main:
        return LoggerGroup([])
    node = cfg.get("logger") or OmegaConf.create({})
    group = LoggerGroup([CurveRecorder(curves)], hparams_of(cfg))
    try:
        for name in chosen_backends(cfg):
            group.loggers.append(open_backend(name, node, run_dir, resumed_step))
    except BaseException:
        group.close("FAILED")
        raise
    log.info("loggers: %s", ", ".join(group.names[1:]) or "none (logger=[])")
    group.start()
    return group


def open_backend(name: str, node: DictConfig, run_dir: Path, resumed_step: int) -> RunLogger:
    """One backend from its keys of the ``logger`` node (a bad value: ``ConfigError`` naming the key)."""
    try:
        if name == "tensorboard":
            from retinanet.report.loggers.tensorboard import TensorBoardLogger

            return TensorBoardLogger(run_dir / "tensorboard", resumed_step)
        if name == "csv":
            from retinanet.report.loggers.csv_file import CsvLogger

            return CsvLogger(run_dir, resumed_step)
        if name == "mlflow":
            from retinanet.report.loggers.mlflow_run import MlflowLogger

            return MlflowLogger(run_dir, node.experiment, node.tracking_uri, node.run_name, resumed_step)
        from retinanet.report.loggers.wandb_run import WandbLogger

        return WandbLogger(run_dir, node.project, node.mode, node.entity, node.run_name, resumed_step)
    except ValueError as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"logger.{err}") from None
