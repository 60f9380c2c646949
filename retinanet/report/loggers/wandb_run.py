"""``logger=wandb``: a Weights & Biases run (extra ``[wandb]``); ``mode=offline`` needs no network.

The run's files live in ``<run dir>/wandb`` (an offline run: ``wandb sync <run dir>/wandb/offline-run-*``
uploads it later). The hyperparameters go to the run's config, every scalar to its history at the
step it belongs to, the final metrics to its summary as ``final/<name>``, the pictures as images
(``pictures/<name>``, at the last step) and the model card and ``metrics.json`` as run files. The run's id is
kept in ``<run dir>/loggers.json``: a resumed run continues the same W&B run (W&B drops the steps it has
already seen, up to where the interrupted run got).
"""

from __future__ import annotations

from pathlib import Path

from retinanet.report.loggers.base import RunLogger, import_backend, recall_id, remember_id

MODES = ("online", "offline", "disabled")


class WandbLogger(RunLogger):
    name = "wandb"

    def __init__(self, run_dir: str | Path, project: str, mode: str | None = None, entity: str | None = None,
                 run_name: str | None = None, resumed_step: int = 0):
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {list(MODES)} (or null: W&B's default)")
        if not isinstance(project, str) or not project:
            raise ValueError(f"project={project!r} must be a non-empty name")
        wandb = import_backend("wandb", "wandb", "wandb")
        run_dir = Path(run_dir).resolve()
        kept = recall_id(run_dir, self.name) if resumed_step else None
        self.run = wandb.init(project=project, entity=entity, name=run_name or run_dir.name, mode=mode,
                              dir=str(run_dir), id=kept["id"] if kept else None,
                              resume="allow" if kept else None)
        remember_id(run_dir, self.name, {"id": self.run.id})
        self.wandb, self.step = wandb, resumed_step

    def log_hparams(self, hparams: dict) -> None:
        self.run.config.update(hparams, allow_val_change=True)

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(dict(scalars), step=step)
        self.step = step

    def log_final(self, hparams: dict, metrics: dict[str, float], step: int) -> None:
        self.run.summary.update({f"final/{k}": v for k, v in metrics.items()})

    def log_artifacts(self, paths: list[Path], root: Path) -> None:
        images = {f"pictures/{p.stem}": self.wandb.Image(str(p)) for p in paths if p.suffix == ".png"}
        if images:
            self.run.log(images, step=self.step)
        for path in paths:
            if path.suffix != ".png":
                self.run.save(str(path), base_path=str(root), policy="now")

    def close(self, status: str = "FINISHED") -> None:
        if status == "KILLED" and hasattr(self.run, "mark_preempting"):
            self.run.mark_preempting()
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)
