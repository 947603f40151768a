"""DataLoader workers: deaf to group-wide stop signals, yet never keep their process from exiting."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

PERSISTENT_WORKERS_LEFT_OPEN = textwrap.dedent("""
    import os, signal, sys
    from torch.utils.data import DataLoader
    from detr_train.data.workers import ignore_stop_signals

    def report(_):
        return os.getpgrp(), signal.getsignal(signal.SIGINT) is signal.SIG_IGN

    loader = DataLoader(list(range(4)), batch_size=2, num_workers=2, persistent_workers=True,
                        worker_init_fn=ignore_stop_signals, collate_fn=report)
    for worker_group, ignores_sigint in loader:
        assert worker_group != os.getpgrp(), "the worker stayed in the group a scheduler signals"
        assert ignores_sigint
    # The loader is left open: multiprocessing's exit handler must still be able to stop it.
    print("iterated", flush=True)
""")


def test_open_persistent_workers_leave_their_group_and_let_the_process_exit():
    finished = subprocess.run([sys.executable, "-c", PERSISTENT_WORKERS_LEFT_OPEN], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "iterated" in finished.stdout
