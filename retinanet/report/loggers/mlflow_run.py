"""``logger=mlflow``: an MLflow run (extra ``[mlflow]``), in a local store under the run dir or on a server.

``tracking_uri=null`` (the default): the ``MLFLOW_TRACKING_URI`` environment variable if set (as MLflow reads
it), else ``sqlite:///<run dir>/mlflow.db`` with the artifacts in
``<run dir>/mlflow_artifacts`` (MLflow 3 refuses its plain file store unless told otherwise; a sqlite file
is a store like a server's: ``mlflow ui --backend-store-uri sqlite:///<run dir>/mlflow.db``). Another
``sqlite:///<path>`` (one store for many runs) keeps the artifacts of the experiments it makes beside that
file, in ``mlflow_artifacts``; a server (``http://...``) keeps its own artifact location. The run is made with
``MlflowClient`` (no global active run): the hyperparameters as params at the start, every scalar as a
metric at its step, the final metrics as ``final/<name>``, the pictures under ``plots/`` and the
model card and ``metrics.json`` as artifacts, and the run's end status (FINISHED, FAILED, KILLED). Its id is
kept in ``<run dir>/loggers.json``: a resumed run continues the same MLflow run (steps after the
checkpoint that were logged before the interruption then appear twice in MLflow's history).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from retinanet.report.loggers.base import RunLogger, import_backend, recall_id, remember_id

log = logging.getLogger(__name__)
MAX_PARAMS = 100     # params per log_batch call (MLflow's limit)
MAX_VALUE = 6000     # characters of a param value (MLflow's limit)


class MlflowLogger(RunLogger):
    name = "mlflow"

    def __init__(self, run_dir: str | Path, experiment: str, tracking_uri: str | None = None,
                 run_name: str | None = None, resumed_step: int = 0):
        if not isinstance(experiment, str) or not experiment:
            raise ValueError(f"experiment={experiment!r} must be a non-empty name")
        if tracking_uri is not None and not isinstance(tracking_uri, str):
            raise ValueError(f"tracking_uri={tracking_uri!r} must be null (a store in the run dir) or a URI")
        import_backend("mlflow", "mlflow", "mlflow")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self.Metric, self.Param = Metric, Param
        run_dir = Path(run_dir).resolve()
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else self.client.create_experiment(
            experiment, artifact_location=artifact_root(self.tracking_uri))
        kept = recall_id(run_dir, self.name) if resumed_step else None
        if kept and kept.get("tracking_uri") == self.tracking_uri:
            self.run_id = kept["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            log.info("logger=mlflow: continuing run %s at %s", self.run_id, self.tracking_uri)
        else:
            run = self.client.create_run(experiment_id, run_name=run_name or run_dir.name,
                                         tags={"retinanet.run_dir": str(run_dir)})
            self.run_id = run.info.run_id
            remember_id(run_dir, self.name, {"run_id": self.run_id, "tracking_uri": self.tracking_uri})
            log.info("logger=mlflow: run %s in experiment %r at %s", self.run_id, experiment, self.tracking_uri)

    def log_hparams(self, hparams: dict) -> None:
        known = self.client.get_run(self.run_id).data.params  # a continued run: MLflow params never change
        params = [self.Param(k, str(v)[:MAX_VALUE]) for k, v in hparams.items() if k not in known]
        for i in range(0, len(params), MAX_PARAMS):
            self.client.log_batch(self.run_id, params=params[i:i + MAX_PARAMS])

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.Metric(k, float(v), now, step) for k, v in scalars.items()])

    def log_final(self, hparams: dict, metrics: dict[str, float], step: int) -> None:
        self.log_scalars({f"final/{k}": v for k, v in metrics.items()}, step)

    def log_artifacts(self, paths: list[Path], root: Path) -> None:
        for path in paths:
            folder = path.parent.relative_to(root).as_posix() if path.parent != root else None
            self.client.log_artifact(self.run_id, str(path), artifact_path=folder)

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def artifact_root(tracking_uri: str) -> str | None:
    """Where a new experiment's artifacts go: beside a sqlite store's file (MLflow's default would be ./mlruns in
    the working directory); None (the store's own default) for a server."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    return (Path(tracking_uri[len(prefix):]).resolve().parent / "mlflow_artifacts").as_uri()
