"""Shared entry-point plumbing for the evaluate / infer / inspect scripts."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from retinanet.errors import UserError

log = logging.getLogger("retinanet")


def run_or_exit(run: Callable[[DictConfig, str], object], cfg: DictConfig):
    """``run(cfg, out_dir)`` (out_dir: ``cfg.output`` or the Hydra run dir); a missing mandatory value
    or a ``UserError`` is logged as one clear line and exits with status 2 (no traceback)."""
    try:
        return run(cfg, cfg.output if cfg.output is not None else HydraConfig.get().runtime.output_dir)
    except MissingMandatoryValue as err:
        log.error("%s is mandatory: set it on the command line, e.g. %s=...", err.full_key, err.full_key)
    except UserError as err:
        log.error("%s", err)
    sys.exit(2)
