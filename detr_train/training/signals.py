"""Graceful stop on pre-emption: finish the current step, checkpoint, exit cleanly."""

from __future__ import annotations

import logging
import signal
import threading

from detr_train.distributed.launch import STOP_SIGNALS

log = logging.getLogger(__name__)



class GracefulStop:
    """Context manager: while active, SIGTERM/SIGINT/SIGUSR1 only set `requested`.

    The training loop polls `requested` after each optimiser step. A second SIGINT
    (impatient Ctrl-C) restores the default behaviour and interrupts at once.
    Once the checkpoint is written, `hand_over()` passes the signal on to whoever
    handled it before us: under submitit that handler requeues the job.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._requested_signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = name
        self._requested_signum = signum
        log.warning("%s received: finishing the current step, then saving a checkpoint", name)

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def hand_over(self) -> None:
        """Call the handler that was installed before ours for the received signal, if it was Python code.

        SIGINT is not passed on: its previous handler raises KeyboardInterrupt, and the
        run has already stopped cleanly.
        """
        signum = self._requested_signum
        previous = self._previous.get(signum) if signum is not None else None
        if signum == signal.SIGINT or not callable(previous):
            return
        log.info("passing %s on to the handler installed before detr-train's", signal.Signals(signum).name)
        self.__exit__(None, None, None)
        previous(signum, None)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
