"""Where this process sits in a torchrun job, read from the environment torchrun sets, and
the signals a scheduler sends to stop it.

Kept free of torch so that the command line can ask before importing anything heavy.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE_PROCESS = DistContext()

# SIGUSR1/SIGUSR2 are what SLURM (--signal) and submitit send ahead of a time limit or pre-emption.
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2") if hasattr(signal, name)
)


def context_from_environment(environ: dict[str, str] | None = None) -> DistContext:
    """This process's place in a torchrun job (a single process when WORLD_SIZE is unset)."""
    env = os.environ if environ is None else environ
    world_size = int(env.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE_PROCESS
    return DistContext(rank=int(env["RANK"]), world_size=world_size, local_rank=int(env.get("LOCAL_RANK", "0")))


def launched_as_non_main_rank(environ: dict[str, str] | None = None) -> bool:
    ctx = context_from_environment(environ)
    return ctx.enabled and not ctx.is_main
