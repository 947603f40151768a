"""Graceful stop on pre-emption: finish the current step, checkpoint, exit cleanly."""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)

# SIGUSR1/SIGUSR2 are what SLURM (--signal) and submitit send ahead of a time limit or pre-emption.
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2") if hasattr(signal, name)
)


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


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: the stop signals are the main process's to handle.

    SLURM, `timeout` and a terminal's Ctrl-C signal the whole process group. A worker that
    died of it would take the epoch down with it before the main process could finish its
    step and checkpoint. So each worker leaves the group (it gets no group-wide signal) and
    ignores the signals only schedulers send (SIGINT, SIGUSR1, SIGUSR2). SIGTERM sent to the
    worker itself keeps its default action: the DataLoader and multiprocessing's exit
    handler stop workers with it and then wait for them, so a worker that ignored it would
    hang its main process at exit. Workers also exit when the main process dies.
    """
    try:
        os.setpgrp()
    except OSError as error:  # not expected for a forked worker; the signals below still apply
        log.debug("DataLoader worker %d stays in its parent's process group: %s", worker_id, error)
    for sig in STOP_SIGNALS:
        if sig != signal.SIGTERM:
            signal.signal(sig, signal.SIG_IGN)
