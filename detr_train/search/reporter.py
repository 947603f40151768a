"""The job side of the search: report validation mAP to the Optuna trial, ask whether to stop.

Inside a search, the run's `search.callbacks.ReportToTrial` does, after each evaluated epoch:

    reporter.report(epoch, result.map)        # epoch is 1-based
    if not the last epoch and reporter.should_prune():
        trainer.request_stop(...)             # a normal end: the sweeper records PRUNED

and `reporter.interrupted(reason)` when a signal stops the run before its end (the trial is
then recorded FAIL and the sweep stops, to be resumed). `reporter_for(cfg.trial)` builds it.

Optuna is imported only when `cfg.trial.number` is set, so plain runs and `--help` never
pay for it.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from detr_train.search import attrs

log = logging.getLogger(__name__)


class Reporter(Protocol):
    def report(self, step: int, value: float) -> None: ...

    def should_prune(self) -> bool: ...

    def interrupted(self, reason: str) -> None: ...


class NullReporter:
    """Outside a search: accepts reports, never prunes."""

    def report(self, step: int, value: float) -> None:
        pass

    def should_prune(self) -> bool:
        return False

    def interrupted(self, reason: str) -> None:
        pass


class TrialReporter:
    """Reports to one running Optuna trial, rebuilt in this process from the shared storage."""

    def __init__(self, trial: Any) -> None:  # optuna.trial.Trial; not imported at module level
        self._trial = trial
        self._last_step: int | None = None

    @property
    def number(self) -> int:
        return self._trial.number

    def report(self, step: int, value: float) -> None:
        self._trial.report(float(value), int(step))
        self._last_step = int(step)

    def should_prune(self) -> bool:
        if not self._trial.should_prune():
            return False
        # The job ends normally after this, so the sweeper cannot tell a pruned run from a
        # finished one by its return value: this attribute is how it learns.
        self._trial.set_user_attr(attrs.PRUNED_AT, self._last_step)
        log.info("Optuna trial %d pruned at step %s", self._trial.number, self._last_step)
        return True

    def interrupted(self, reason: str) -> None:
        """Say that the run was stopped before its end (a signal, pre-emption) although it
        returns normally: the sweeper then records FAIL, not COMPLETE, stops the sweep, and a
        re-run of the sweep runs a new trial in its place."""
        self._trial.set_user_attr(attrs.INTERRUPTED, str(reason))
        log.warning("Optuna trial %d interrupted (%s)", self._trial.number, reason)


def reporter_for(trial_cfg: Any) -> Reporter:
    """A TrialReporter when `trial_cfg.number` is set (inside a search), else a NullReporter.

    `trial_cfg` is the config's `trial` block: `{study_name, storage, number}`.
    """
    number = None if trial_cfg is None else trial_cfg.get("number")
    if number is None:
        return NullReporter()
    return _open_trial_reporter(str(trial_cfg.get("study_name")), str(trial_cfg.get("storage")), int(number))


def _open_trial_reporter(study_name: str, storage_url: str, number: int) -> Reporter:
    import optuna

    from detr_train.search.factories import build_pruner
    from detr_train.search.storage import open_storage

    storage = open_storage(storage_url)
    try:
        study_id = storage.get_study_id_from_name(study_name)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
    except KeyError as error:
        raise RuntimeError(
            f"trial.number={number} of study '{study_name}' is not in the storage {storage_url!r}: "
            "the trial block is filled in by the sweeper; leave it null outside a search"
        ) from error
    state = storage.get_trial(trial_id).state
    if state != optuna.trial.TrialState.RUNNING:
        # E.g. a trial re-run by hand with its old overrides: reporting would corrupt the study.
        log.warning("Optuna trial %d of study '%s' is %s, not RUNNING: not reporting to it", number, study_name, state.name)
        return NullReporter()
    pruner_spec = storage.get_study_user_attrs(study_id).get(attrs.PRUNER)
    if pruner_spec is None:
        log.warning("Study '%s' stores no pruner config: this trial will not be pruned", study_name)
    study = optuna.load_study(
        study_name=study_name,
        storage=storage,
        # The sweeper samples every parameter; the job never asks the sampler for anything.
        sampler=optuna.samplers.RandomSampler(),
        pruner=build_pruner(pruner_spec),
    )
    trial = optuna.trial.Trial(study, trial_id)
    earlier = trial.user_attrs.get(attrs.INTERRUPTED)
    if earlier is not None:
        # Still RUNNING although an earlier attempt was interrupted: the sweeper has not told
        # the trial, so it is still waiting for this very job, which its launcher requeued
        # (submitit's max_num_timeout). This attempt resumes the run; its outcome is the trial's.
        trial.set_user_attr(attrs.INTERRUPTED, None)
        log.info("Optuna trial %d: requeued after '%s', carrying on", number, earlier)
    return TrialReporter(trial)
