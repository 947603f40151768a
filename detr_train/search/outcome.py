"""Turn what a job gave back (Hydra's JobReturn) into the state and value Optuna records."""

from __future__ import annotations

import math
import traceback
from dataclasses import dataclass

import optuna
from hydra.core.utils import JobReturn, JobStatus
from optuna.trial import FrozenTrial, TrialState

from detr_train.search import attrs


@dataclass(frozen=True)
class Outcome:
    state: TrialState
    value: float | None = None  # only for COMPLETE; Optuna gives PRUNED trials their last report
    error: str | None = None  # one line, for the study and trials.csv
    details: str | None = None  # the full traceback, for the log
    interrupted: bool = False  # cut short by a signal: the sweep must stop


def judge(job: JobReturn, stored: FrozenTrial) -> Outcome:
    """PRUNED if the job's reporter was told to stop (or the job raised TrialPruned),
    FAIL if it raised, was interrupted or returned no finite number, COMPLETE otherwise.

    `stored` is the trial as read back from the storage after the job, carrying what the
    job's reporter wrote into it.
    """
    reason = stored.user_attrs.get(attrs.INTERRUPTED)
    if reason is not None:
        # A run stopped by a signal returns normally (its checkpoint saved); its value is not
        # the value of the configuration.
        return Outcome(TrialState.FAIL, error=f"interrupted: {reason}", interrupted=True)
    if job.status == JobStatus.FAILED:
        error = job._return_value  # Hydra keeps the job's exception here
        if isinstance(error, optuna.TrialPruned):
            return Outcome(TrialState.PRUNED)
        return _failed(error)
    if job.status != JobStatus.COMPLETED:
        return Outcome(TrialState.FAIL, error=f"the job ended with status {job.status.name}")
    if stored.user_attrs.get(attrs.PRUNED_AT) is not None:
        return Outcome(TrialState.PRUNED)
    returned = job.return_value
    try:
        value = float(returned)
    except (TypeError, ValueError):
        return Outcome(TrialState.FAIL, error=f"the job returned {returned!r}, not a number to optimise")
    if not math.isfinite(value):
        return Outcome(TrialState.FAIL, error=f"the job returned {value}, not a finite number")
    return Outcome(TrialState.COMPLETE, value=value)


def _failed(error: BaseException | None) -> Outcome:
    if error is None:
        return Outcome(TrialState.FAIL, error="the job failed without an exception")
    summary = f"{type(error).__name__}: {error}"
    details = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return Outcome(TrialState.FAIL, error=summary, details=details)
