"""Signals that stop training: SIGTERM or Ctrl-C -> a flag the loop reads after each step, then ``last.pt``."""

from __future__ import annotations

import logging
import signal
import threading
import time

log = logging.getLogger(__name__)


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
