"""Training from Python: ``retinanet.train(overrides=[...])`` runs what ``retinanet-train`` runs.

    from retinanet import Detector, train
    run = train(overrides=["trainer.epochs=3", "loss=focal"])   # the embedded shapes data
    print(run.ap, run.best)                           # the final AP, outputs/shapes/<date>_<time>/best.pt
    detector = Detector.from_checkpoint(run.best)

The config is composed from the command's tree (``retinanet/configs``, Hydra's compose API), so group
choices (``loss=focal``) and keys (``trainer.epochs=3``) mean what they mean on the command line. The run
dir is ``outputs/<data.name>/<date>_<time>`` below the current folder, as the command's (a suffix ``_2``,
``_3``, ... when it exists already), or ``out_dir``; it holds the same files: ``config.yaml``, ``train.log``,
``metrics.json``, ``last.pt`` / ``best.pt``, ``tensorboard/``, ``plots/``.

A mistake in the overrides or the config raises a ``ConfigError`` (a ``UserError``, the one-line message
the command prints); a SIGTERM or Ctrl-C saves ``last.pt`` and raises ``KeyboardInterrupt``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from hydra.initialize import get_gh_backup, restore_gh_from_backup
from omegaconf import DictConfig, open_dict

from retinanet.errors import ConfigError
from retinanet.trainer import TrainResult, fit

LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's, as in the command's train.log


def train(overrides: Sequence[str] = (), out_dir: str | Path | None = None) -> TrainResult:
    """Train with the config ``retinanet-train <overrides>`` would use, into ``out_dir`` (default: a new
    ``outputs/<data.name>/<date>_<time>``); returns the run dir, ``best`` / ``last`` checkpoints and the final
    validation ``metrics`` (``ap``)."""
    cfg, default_dir = compose_train_config(overrides)
    run_dir = Path(out_dir) if out_dir is not None else new_folder(default_dir)
    with log_to(run_dir / "train.log"):
        try:
            return fit(cfg, run_dir)
        except SystemExit as stopped:  # a signal: the loop saved last.pt and exits as the command does
            raise KeyboardInterrupt(f"training stopped by a signal (exit code {stopped.code}): {run_dir / 'last.pt'} "
                                    "is saved; continue with overrides [..., 'trainer.resume=auto'] and the same "
                                    "out_dir") from None


def compose_train_config(overrides: Sequence[str]) -> tuple[DictConfig, Path]:
    """The training config of ``overrides`` and the run dir the command would use (``hydra.run.dir``)."""
    overrides = [str(o) for o in overrides]
    outer = get_gh_backup()  # Hydra's global state as the caller has it (e.g. inside a Hydra app): put back after
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="retinanet.configs", version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    except HydraException as err:
        message = " ".join(str(err).split("\nConfig search path")[0].split())
        raise ConfigError(f"overrides {overrides}: {message}") from None
    finally:
        restore_gh_from_backup(outer)
    run_dir = Path(cfg.hydra.run.dir)
    with open_dict(cfg):
        del cfg["hydra"]  # as the command's job sees it
    return cfg, run_dir


def new_folder(path: Path) -> Path:
    """``path``, or ``path_2``, ``path_3``, ... if it exists (two runs started in the same second)."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}_{n}")
    return candidate


@contextlib.contextmanager
def log_to(path: Path) -> Iterator[None]:
    """The package's log records (INFO and up) also to ``path`` while the block runs, as the command writes its
    ``train.log``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("retinanet")
    level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(level)
