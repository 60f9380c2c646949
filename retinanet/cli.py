"""The entry points' shared plumbing: one error path, and what the command line set.

Every entry point (train, evaluate, infer, inspect) runs its job through ``run_or_exit``: a mistake
the user can fix (a ``UserError``: bad path, bad file, bad value, missing mandatory key) is printed as
one line naming the file / key / value and the process exits with status 2, never with a traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from retinanet.errors import UserError

log = logging.getLogger("retinanet")


def user_message(err: BaseException) -> str:
    """The message of a ``UserError``. An error raised in a DataLoader worker reaches the main process as the
    worker's whole traceback ("Caught ImageReadError in DataLoader worker process 0 ... Original Traceback");
    its last line holds the message."""
    text = str(err)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        return last.split(f"{type(err).__name__}: ", 1)[-1]
    return text


def run_or_exit(run: Callable[[DictConfig, str], object], cfg: DictConfig, out_dir: str | None = None):
    """``run(cfg, out_dir)`` (default out_dir: ``cfg.output``, else the Hydra run dir); a missing mandatory
    value or a ``UserError`` is logged as one clear line and exits with status 2 (no traceback)."""
    try:
        if out_dir is None:
            out_dir = cfg.get("output") or HydraConfig.get().runtime.output_dir
        return run(cfg, out_dir)
    except MissingMandatoryValue as err:
        log.error("%s is mandatory: set it on the command line, e.g. %s=...", err.full_key, err.full_key)
    except UserError as err:
        log.error("%s", user_message(err))
    sys.exit(2)


def command_line_values(cfg: DictConfig, group: str) -> dict:
    """The keys of ``group`` set on the command line (``postprocess.nms_thresh=0.6``), with their values.

    evaluate / infer take the checkpoint's settings except these. Outside a Hydra job: {}.
    """
    try:
        overrides = HydraConfig.get().overrides.task
    except ValueError:
        return {}
    values = {}
    for text in overrides:
        key = str(text).split("=", 1)[0].lstrip("+~")
        if key.startswith(group + "."):
            name = key[len(group) + 1:]
            values[name] = OmegaConf.select(cfg, key)
    return values
