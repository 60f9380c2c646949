"""Checkpoints: the training state of a run, written atomically, read back with ``weights_only=True``.

A checkpoint (``last.pt``, written at every epoch end, every ``trainer.checkpoint_every_steps``
optimiser steps and when SIGTERM / Ctrl-C arrives) holds everything the next step depends on:
model, optimiser, scheduler, AMP scaler, EMA, the position (epoch, micro-batches done in it,
global step), the running loss sums of the epoch, the RNG states, the resolved config, the label
map, the history and the logged loss / learning-rate curves (``plots/loss_lr.png``). Batches and
augmentations are functions of (seed, epoch, index) (``retinanet.data.samplers``), so a resumed
run trains on exactly what the interrupted one would have: on CPU with
``trainer.deterministic=true`` it ends bit-identical.

Here: ``Checkpointer`` (save, ``best.pt``, load for resume) and ``TrainState``; ``load_checkpoint`` (a
checkpoint of this project) and ``read_state_dict`` (the weights of any file in the layouts in use: the
only ``torch.load`` of weights in the package); the checkpoint ``trainer.resume`` names; RNG states as
plain containers; per-epoch copies. The atomic writes themselves are ``retinanet.files``.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from retinanet import distributed
from retinanet.errors import UserError
from retinanet.files import atomic_link, atomic_save

if TYPE_CHECKING:
    from retinanet.engine import EpochProgress

# The training loop's pieces (engine.EpochProgress, the model card) are imported where they are used: the model
# (backbone weights, init_from) imports this module to read weights, and must not depend on the loop or the reports.

log = logging.getLogger(__name__)


class CheckpointError(UserError):
    """A checkpoint or weights file is missing, unreadable or not in a layout of this project; the message names
    the file."""


def _torch_load(path: Path, what: str):
    """``torch.load(path, weights_only=True)`` on the CPU; ``CheckpointError`` naming ``what`` and the file when it
    fails. Files holding Python objects other than tensors and plain containers are refused, never unpickled:
    loading them could run arbitrary code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" in str(err):  # a pickled class or function: the blocked part of weights_only
            raise CheckpointError(f"{what} {str(path)!r} cannot be read: it holds Python objects other than "
                                  "tensors and plain containers, which are refused because loading them could "
                                  "run code (this project writes plain checkpoints only)") from None
        raise CheckpointError(f"{what} {str(path)!r} cannot be read: not a PyTorch checkpoint, or a "
                              "truncated one") from None
    except Exception as err:  # noqa: BLE001 - any other decoding failure: name the file, not torch's advice
        raise CheckpointError(f"{what} {str(path)!r} cannot be read: not a PyTorch checkpoint, or a truncated "
                              f"one ({type(err).__name__})") from None


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by this project (plain containers only: ``weights_only=True``), on the CPU.

    Raises ``CheckpointError`` (a ``UserError``: one clear line, exit code 2 at the entry points) for a
    missing, truncated, foreign or unsafe file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist (give the best.pt or last.pt of a "
                              "training run, e.g. outputs/shapes/<date>/best.pt)")
    ckpt = _torch_load(path, "checkpoint")
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a RetinaNet checkpoint of this project (no "
                              "'model' entry)")
    return ckpt


def checkpoint_weights(ckpt: Mapping, weights: str = "auto", path="checkpoint") -> dict:
    """The state dict of a checkpoint that a detector should run: ``auto`` = the EMA weights when the run kept
    an EMA (they are what was evaluated and chose ``best.pt``), else the raw weights."""
    if weights not in ("auto", "ema", "model"):
        raise ValueError(f"weights={weights!r} must be auto, ema or model")
    ema = ckpt.get("ema")
    if weights == "ema" and not ema:
        raise CheckpointError(f"checkpoint {str(path)!r} holds no EMA weights (trained without trainer.ema.decay)")
    if weights in ("auto", "ema") and ema:
        return ema["model"]
    return ckpt["model"]


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights a file holds, in any layout in use: a checkpoint of this project (the weights that scored:
    ``checkpoint_weights``), a dict of tensors under ``"model"`` (torchvision's reference scripts), or a bare
    state dict. Entries that are not tensors are left out.

    Raises ``CheckpointError`` naming the file when it is missing, unreadable or holds no tensor; callers add
    the setting that named it (``model.init_from=...``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} does not exist")
    state = _torch_load(path, "weights file")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = checkpoint_weights(state, path=path) if "config" in state else state["model"]
    if not isinstance(state, dict) or not any(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"weights file {str(path)!r} holds no state dict (a dict of tensors, or one under "
                              "'model')")
    return {k: v for k, v in state.items() if torch.is_tensor(v)}


EPOCH_FILE = re.compile(r"epoch_(\d+)\.pt")


def keep_epoch_copy(last: Path, epoch: int, keep: int) -> None:
    """``epoch_NNNN.pt`` = this epoch's ``last.pt``; only the newest ``keep`` such files stay."""
    if keep <= 0:
        return
    atomic_link(last, last.with_name(f"epoch_{epoch:04d}.pt"))
    found = sorted((int(m.group(1)), p) for p in last.parent.iterdir() if (m := EPOCH_FILE.fullmatch(p.name)))
    for _, p in found[:-keep]:
        p.unlink(missing_ok=True)


def resume_path(resume: str | None, out_dir: Path) -> Path | None:
    """The checkpoint ``trainer.resume`` points to: None (fresh start), ``auto`` (``out_dir/last.pt`` if any)
    or a path (must exist)."""
    if resume in (None, "", "null", "none"):
        return None
    if str(resume) == "auto":
        path = out_dir / "last.pt"
        if path.is_file():
            return path
        log.info("trainer.resume=auto: no %s yet, starting from scratch", path)
        return None
    path = Path(str(resume))
    if not path.is_file():
        raise UserError(f"trainer.resume={str(resume)!r} does not exist; give a checkpoint file (last.pt), "
                        "auto (the run dir's last.pt if any) or null")
    return path


def resumed_recipe(resume: str | None, out_dir: Path) -> dict | None:
    """``{"path", "recipe"}``: the checkpoint ``trainer.resume`` points to and its config's ``recipe`` section (the
    choices ``recipe=auto`` made for that run, which a resume keeps); None for a fresh start. Read on rank 0, the
    others get its answer."""
    def read():
        if str(resume) == "auto" and not (Path(out_dir) / "last.pt").is_file():
            return None  # a fresh start (start_state says so)
        path = resume_path(resume, Path(out_dir))
        if path is None:
            return None
        return {"path": str(path), "recipe": (load_checkpoint(path).get("config") or {}).get("recipe")}

    return distributed.broadcast_object(read() if distributed.info().is_main else None)


def rng_state() -> dict:
    """Python, numpy and torch (CPU and CUDA) RNG states as plain containers (``weights_only`` loadable)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "words": list(words), "gauss": gauss},
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["words"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _epoch_progress(state: dict | None = None) -> EpochProgress:
    """The position inside an epoch (``engine.EpochProgress``): a new one, or the one a checkpoint saved."""
    from retinanet.engine import EpochProgress

    return EpochProgress.from_state(state)


@dataclass
class TrainState:
    """Where training is: the epoch to run (and how far into it), the global step, the history so far."""

    epoch: int = 1
    progress: EpochProgress = field(default_factory=_epoch_progress)
    step: int = 0
    history: list = field(default_factory=list)
    best_ap: float = -1.0
    bad_steps: int = 0
    resumed_from: str | None = None
    planned_steps: int | None = None    # the run's total steps as trainer.time_limit planned them (None: no limit)
    budget: dict | None = None          # trainer.time_limit's plan and pace (retinanet.budget.RunPlan.state_dict)
    curves: dict = field(default_factory=dict)  # {"loss" | "loss_cls" | "loss_box" | "lr": [[step, value], ...]}


@dataclass
class Checkpointer:
    """Writes (rank 0) and reads the training state of one run; ``save`` must be called on every rank."""

    out_dir: Path
    model: nn.Module            # unwrapped (no DDP): its state_dict has the plain parameter names
    optimizer: object
    scheduler: object
    scaler: object | None
    ema: object | None
    sampler_key: dict           # what the position inside an epoch depends on (world size, batch, ...)
    config: dict
    label_map: dict
    provenance: dict | None = None  # retinanet.report.provenance.collect(): versions, git commit, data files (rank 0)
    _card: dict | None = field(default=None, init=False, repr=False)  # the facts of the last save, for mark_best

    @property
    def last(self) -> Path:
        return self.out_dir / "last.pt"

    def save(self, state: TrainState, epoch_complete: bool, metrics: dict | None = None) -> None:
        digests = distributed.replica_digests(self.model) if distributed.info().enabled else None
        if not distributed.info().is_main:
            return
        if digests is not None and len(set(digests)) > 1:
            log.error("the model replicas differ across ranks at step %d (parameter digests %s): "
                      "rank 0's weights are saved", state.step, [d[:12] for d in digests])
        ckpt = {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "epoch": state.epoch, "step": state.step,
            "epoch_complete": epoch_complete, "epoch_progress": state.progress.state_dict(),
            "sampler": dict(self.sampler_key), "rng": rng_state(), "config": self.config,
            "label_map": self.label_map, "metrics": metrics, "history": state.history,
            "best_ap": state.best_ap, "bad_steps": state.bad_steps, "planned_steps": state.planned_steps,
            "budget": state.budget,
            "curves": {k: torch.tensor(v, dtype=torch.float64).reshape(-1, 2) for k, v in state.curves.items()},
            "provenance": self.provenance,
        }
        if self.scaler is not None:
            ckpt["scaler"] = self.scaler.state_dict()
        if self.ema is not None:
            ckpt["ema"] = self.ema.state_dict()
        if digests is not None:
            ckpt["replica_digests"] = digests
        atomic_save(ckpt, self.last)
        self._card = {"history": list(state.history), "metrics": metrics, "step": state.step}

    def mark_best(self) -> None:
        """``best.pt`` = the ``last.pt`` just saved, and its model card beside it (``retinanet.report.model_card``)."""
        from retinanet.report.model_card import model_card, write_model_card

        if distributed.info().is_main:
            atomic_link(self.last, self.out_dir / "best.pt")
            if self._card is not None:  # the facts of the checkpoint best.pt now is
                card = model_card(self.config, self.label_map, self.provenance, parameters=sum(
                    p.numel() for p in self.model.parameters()), **self._card)
                write_model_card(self.out_dir, card)

    def load(self, path: Path) -> TrainState:
        """Restore every object from checkpoint ``path``; returns where to continue."""
        ckpt = load_checkpoint(path)  # a bad file: CheckpointError naming it (one line, exit code 2)
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as err:
            raise UserError(f"trainer.resume: the weights of {str(path)!r} do not fit this model "
                            f"(was it trained with another model preset?): {str(err)[:300]}") from None
        if "optimizer" not in ckpt or "scheduler" not in ckpt:
            raise UserError(f"trainer.resume: {str(path)!r} holds weights only, not a training state; "
                            "start a new run from them with model.init_from instead")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and "scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            if "ema" in ckpt:
                self.ema.load_state_dict(ckpt["ema"])
            else:
                log.warning("trainer.resume: %s has no EMA weights; the EMA restarts from the current weights", path)
                self.ema.module.load_state_dict(self.model.state_dict())
        if "rng" in ckpt:
            set_rng_state(ckpt["rng"])
        then = (ckpt.get("provenance") or {}).get("git") or {}
        now = (self.provenance or {}).get("git") or {}
        if then.get("commit") and now.get("commit") and then["commit"] != now["commit"]:
            log.warning("trainer.resume: %s was written by code at git commit %s, this is commit %s", path,
                        then.get("commit"), now.get("commit"))
        state = TrainState(epoch=int(ckpt["epoch"]), step=int(ckpt["step"]), history=list(ckpt.get("history", [])),
                           best_ap=float(ckpt.get("best_ap", -1.0)), bad_steps=int(ckpt.get("bad_steps", 0)),
                           resumed_from=str(path), planned_steps=ckpt.get("planned_steps"), budget=ckpt.get("budget"),
                           curves={k: v.tolist() for k, v in ckpt.get("curves", {}).items()})
        if ckpt.get("epoch_complete", True):
            state.epoch += 1
        elif ckpt.get("sampler") != self.sampler_key:
            log.warning("trainer.resume: the position inside epoch %d cannot carry over (%s then, %s now): "
                        "that epoch restarts from its first batch", state.epoch, ckpt.get("sampler"), self.sampler_key)
        else:
            state.progress = _epoch_progress(ckpt.get("epoch_progress"))
        log.info("resumed from %s: epoch %d, %d batches into it, step %d", path, state.epoch,
                 state.progress.batches, state.step)
        return state
