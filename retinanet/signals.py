"""Signals that stop training: SIGTERM, Ctrl-C, or submitit's preemption signal -> a flag the loop reads after each
step, then ``last.pt`` (and, for submitit's signal, submitit's own requeue)."""

from __future__ import annotations

import logging
import signal
import threading
import time

from retinanet import cluster

log = logging.getLogger(__name__)


class StopSignal:
    """SIGTERM or SIGINT (Ctrl-C) -> a flag: training stops after the current step and saves ``last.pt``.

    In a submitit job, its preemption / time-limit signal (SIGUSR2 by default) too; once ``last.pt`` is saved,
    ``hand_over()`` passes that signal on to the handler submitit had installed, which requeues the job (from
    the task of global rank 0; the others return) and exits: the requeued job resumes the run dir.

    A second signal stops at once (``KeyboardInterrupt``), unless it comes within ``grace`` seconds
    of the first: Ctrl-C under torchrun reaches a worker twice (from the terminal, and forwarded by
    the agent). Handlers are only installed from the main thread; ``restore()`` puts the previous
    ones back.
    """

    def __init__(self, grace: float = 2.0):
        self.signum: int | None = None
        self.grace, self._first = grace, 0.0
        self._previous: dict = {}
        self.requeue_signal = cluster.preemption_signal()

    def install(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            # a set: with SUBMITIT_PREEMPT_SIGNAL=TERM, SIGTERM is installed once (its previous handler: submitit's)
            for sig in {signal.SIGTERM, signal.SIGINT, self.requeue_signal} - {None}:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def hand_over(self) -> None:
        """After ``last.pt`` is saved: submitit's preemption signal goes on to submitit's handler (which requeues
        the job and exits on global rank 0); nothing for other signals."""
        handler = self._previous.get(self.requeue_signal)
        if self.signum is not None and self.signum == self.requeue_signal and callable(handler):
            log.warning("handing %s over to submitit: requeue this job; it resumes from last.pt",
                        signal.Signals(self.signum).name)
            self.restore()
            handler(self.signum, None)

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
