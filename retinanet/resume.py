"""Never lose a run: the training state in a checkpoint, exact resume from it, and graceful stops.

A checkpoint (``last.pt``, written at every epoch end, every ``trainer.checkpoint_every_steps``
optimiser steps and when SIGTERM / Ctrl-C arrives) holds everything the next step depends on:
model, optimiser, scheduler, AMP scaler, EMA, the position (epoch, micro-batches done in it,
global step), the running loss sums of the epoch, the RNG states, the resolved config, the label
map, the history and the logged loss / learning-rate curves (``plots/loss_lr.png``). Batches and
augmentations are functions of (seed, epoch, index) (``retinanet.data.samplers``), so a resumed
run trains on exactly what the interrupted one would have: on CPU with
``trainer.deterministic=true`` it ends bit-identical.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from retinanet import distributed
from retinanet.checkpoint import atomic_link, atomic_save, load_checkpoint, rng_state, set_rng_state
from retinanet.engine import EpochProgress
from retinanet.errors import UserError
from retinanet.model_card import model_card, write_model_card

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Where training is: the epoch to run (and how far into it), the global step, the history so far."""

    epoch: int = 1
    progress: EpochProgress = field(default_factory=EpochProgress)
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
    provenance: dict | None = None  # retinanet.provenance.collect(): versions, git commit, data files (rank 0)
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
        """``best.pt`` = the ``last.pt`` just saved, and its model card beside it (``retinanet.model_card``)."""
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
            state.progress = EpochProgress.from_state(ckpt.get("epoch_progress"))
        log.info("resumed from %s: epoch %d, %d batches into it, step %d", path, state.epoch,
                 state.progress.batches, state.step)
        return state


class StopSignal:
    """SIGTERM or SIGINT (Ctrl-C) -> a flag: training stops after the current step and saves ``last.pt``.

    A second signal stops at once (``KeyboardInterrupt``), unless it comes within ``grace`` seconds
    of the first: Ctrl-C under torchrun reaches a worker twice (from the terminal, and forwarded by
    the agent). Handlers are only installed from the main thread; ``restore()`` puts the previous
    ones back.
    """

    def __init__(self, grace: float = 2.0):
        self.signum: int | None = None
        self.grace, self._first = grace, 0.0
        self._previous: dict = {}

    def install(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            if time.monotonic() - self._first < self.grace:
                return
            self.restore()
            raise KeyboardInterrupt
        self.signum, self._first = signum, time.monotonic()
        log.warning("%s received: stopping after the current step and saving last.pt (send it again to stop at "
                    "once, without saving)", signal.Signals(signum).name)

    def requested(self) -> bool:
        return self.signum is not None

    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGTERM)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
