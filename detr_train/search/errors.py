"""Errors the search raises before a trial starts or when it has to give up."""

from __future__ import annotations

from hydra.errors import CompactHydraException


class SearchConfigError(CompactHydraException):
    """The sweep cannot start: bad search space, sampler, pruner or storage.

    A CompactHydraException: Hydra prints just the message (no traceback) and exits 1.
    """


class TooManyFailedTrials(CompactHydraException):
    """More trials crashed than `hydra.sweeper.max_failure_rate` allows."""


class SweepInterrupted(CompactHydraException):
    """A trial was stopped by a signal; the study is saved and a re-run resumes it."""
