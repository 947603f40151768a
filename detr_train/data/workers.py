"""DataLoader worker set-up: the stop signals are the main process's to handle."""

from __future__ import annotations

import logging
import os
import signal

from detr_train.distributed.launch import STOP_SIGNALS

log = logging.getLogger(__name__)


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
