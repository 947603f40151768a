"""Errors the search raises before a trial starts or when it has to give up."""

from __future__ import annotations

from hydra.errors import CompactHydraException

from detr_train.errors import DetrTrainError


class SearchConfigError(DetrTrainError, CompactHydraException):
    """The sweep cannot start: bad search space, sampler, pruner or storage.

    The sweeper prints it as one line and exits with status 2, like any config error.
    """


class TooManyFailedTrials(CompactHydraException):
    """More trials crashed than `hydra.sweeper.max_failure_rate` allows (Hydra prints the
    message without a traceback and exits 1)."""


class SweepInterrupted(CompactHydraException):
    """A trial was stopped by a signal; the study is saved and a re-run resumes it."""
