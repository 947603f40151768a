"""The job side of the search channel (reporter) and how the sweeper reads a job's end (outcome)."""

from __future__ import annotations

import subprocess
import sys

import optuna
import pytest
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf
from optuna.trial import TrialState

from detr_train.checkpointing.plan import Plan
from detr_train.search import attrs
from detr_train.search.outcome import judge
from detr_train.search.reporter import NullReporter, TrialReporter, reporter_for
from detr_train.search.storage import open_storage
from tests.conftest import make_trainer


def test_outside_a_search_the_reporter_is_a_no_op_and_optuna_is_never_imported():
    # Hydra imports every plugin at start-up (even for --help): neither the shim nor a
    # plain run may pull in Optuna.
    code = (
        "import sys\n"
        "import hydra_plugins.detr_train_sweeper.detr_train_sweeper\n"
        "from detr_train.search.reporter import reporter_for\n"
        "r = reporter_for({'study_name': None, 'storage': None, 'number': None})\n"
        "r.report(1, 0.5); assert r.should_prune() is False; r.interrupted('SIGTERM')\n"
        "assert 'optuna' not in sys.modules, 'optuna was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert isinstance(reporter_for(None), NullReporter)


@pytest.fixture
def study(tmp_path) -> tuple[optuna.Study, str]:
    url = str(tmp_path / "journal.log")
    study = optuna.create_study(study_name="s", storage=open_storage(url), direction="maximize")
    study.set_user_attr(attrs.PRUNER, {"_target_": "optuna.pruners.ThresholdPruner", "lower": 0.3})
    return study, url


def _trial_cfg(url: str, number: int):
    return OmegaConf.create({"study_name": "s", "storage": url, "number": number})


def test_the_reporter_reports_to_the_stored_trial_and_prunes_with_the_stored_pruner(study):
    study, url = study
    trial = study.ask()
    reporter = reporter_for(_trial_cfg(url, trial.number))
    assert isinstance(reporter, TrialReporter)
    reporter.report(1, 0.5)
    assert reporter.should_prune() is False
    reporter.report(2, 0.1)  # below the stored ThresholdPruner's lower=0.3
    assert reporter.should_prune() is True
    stored = study.trials[0]
    assert stored.intermediate_values == {1: 0.5, 2: 0.1}
    assert stored.user_attrs[attrs.PRUNED_AT] == 2
    assert stored.state == TrialState.RUNNING  # only the sweeper tells
    reporter.interrupted("SIGTERM")
    assert study.trials[0].user_attrs[attrs.INTERRUPTED] == "SIGTERM"


def test_a_requeued_job_carries_on_the_trial_its_interrupted_attempt_left(study):
    # submitit requeues a pre-empted job (max_num_timeout): the same trial, still RUNNING
    # because the sweeper waits for the job, is reopened by the next attempt.
    study, url = study
    trial = study.ask()
    first = reporter_for(_trial_cfg(url, trial.number))
    first.report(1, 0.5)
    first.interrupted("SIGUSR2")
    second = reporter_for(_trial_cfg(url, trial.number))
    second.report(2, 0.6)
    stored = study.trials[0]
    assert stored.user_attrs[attrs.INTERRUPTED] is None
    assert stored.intermediate_values == {1: 0.5, 2: 0.6}
    done = JobReturn(status=JobStatus.COMPLETED, _return_value=0.6)
    assert judge(done, stored).state == TrialState.COMPLETE


def test_a_finished_trial_is_not_reported_to(study, caplog):
    study, url = study
    trial = study.ask()
    study.tell(trial, 0.4)
    reporter = reporter_for(_trial_cfg(url, trial.number))
    assert isinstance(reporter, NullReporter)
    assert "is COMPLETE, not RUNNING" in caplog.text


def test_a_trial_that_is_not_in_the_storage_is_a_clear_error(study):
    _, url = study
    with pytest.raises(RuntimeError, match="trial.number=7 of study 's' is not in the storage"):
        reporter_for(_trial_cfg(url, 7))


def _job(status: JobStatus, value) -> JobReturn:
    job = JobReturn()
    job.status, job._return_value = status, value
    return job


def _stored(**user_attrs) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(state=TrialState.RUNNING, user_attrs=user_attrs)


@pytest.mark.parametrize(
    ("job", "stored", "state", "value"),
    [
        (_job(JobStatus.COMPLETED, 0.7), _stored(), TrialState.COMPLETE, 0.7),
        (_job(JobStatus.COMPLETED, 0.2), _stored(**{attrs.PRUNED_AT: 2}), TrialState.PRUNED, None),
        (_job(JobStatus.COMPLETED, 0.2), _stored(**{attrs.INTERRUPTED: "SIGTERM"}), TrialState.FAIL, None),
        (_job(JobStatus.FAILED, optuna.TrialPruned()), _stored(), TrialState.PRUNED, None),
        (_job(JobStatus.FAILED, RuntimeError("out of memory")), _stored(), TrialState.FAIL, None),
        (_job(JobStatus.COMPLETED, float("nan")), _stored(), TrialState.FAIL, None),
        (_job(JobStatus.COMPLETED, None), _stored(), TrialState.FAIL, None),
    ],
)
def test_a_jobs_end_maps_to_one_optuna_state(job, stored, state, value):
    outcome = judge(job, stored)
    assert (outcome.state, outcome.value) == (state, value)
    assert (outcome.error is not None) == (state == TrialState.FAIL)


def test_a_failed_job_keeps_its_error_and_traceback():
    try:
        raise RuntimeError("CUDA out of memory")
    except RuntimeError as error:
        outcome = judge(_job(JobStatus.FAILED, error), _stored())
    assert outcome.error == "RuntimeError: CUDA out of memory"
    assert "Traceback" in outcome.details and "CUDA out of memory" in outcome.details


@pytest.mark.slow
def test_the_trainer_stops_a_pruned_trial_but_never_discards_its_last_epoch(small_run_overrides, tmp_path):
    # A pruner that prunes every report (mAP is always below 1) stops a 2-epoch trial after
    # epoch 1; a 1-epoch trial is not asked after its only, and last, epoch: pruning there
    # (a successive-halving rung can land on it) would only throw away a finished result.
    from tests.conftest import compose_config, make_trainer

    url = str(tmp_path / "journal.log")
    study = optuna.create_study(study_name="s", storage=open_storage(url), direction="maximize")
    study.set_user_attr(attrs.PRUNER, {"_target_": "optuna.pruners.ThresholdPruner", "lower": 1.0})
    for epochs in (2, 1):
        trial = study.ask()
        cfg = compose_config(small_run_overrides + [
            f"training.epochs={epochs}", "training.subset_size=8", "training.val_subset_size=8",
            "trial.study_name=s", f"trial.storage={url}", f"trial.number={trial.number}",
        ])
        make_trainer(Plan(cfg, tmp_path / f"trial_{trial.number}")).fit()
    cut_short, last_epoch_only = study.trials
    assert list(cut_short.intermediate_values) == [1]
    assert cut_short.user_attrs[attrs.PRUNED_AT] == 1
    assert list(last_epoch_only.intermediate_values) == [1]
    assert attrs.PRUNED_AT not in last_epoch_only.user_attrs


@pytest.mark.slow
def test_a_trial_that_stops_early_is_complete_not_pruned(small_run_overrides, tmp_path):
    # The pruner would prune every report from epoch 2 on; early stopping ends the run at
    # epoch 2 first, so the trial finished: no pruning mark, its best value returned.
    from hydra.core.utils import JobReturn, JobStatus

    from detr_train.search.outcome import judge
    from tests.conftest import compose_config

    url = str(tmp_path / "journal.log")
    study = optuna.create_study(study_name="s", storage=open_storage(url), direction="maximize")
    study.set_user_attr(attrs.PRUNER, {"_target_": "optuna.pruners.ThresholdPruner", "lower": 1.0,
                                       "n_warmup_steps": 2})
    trial = study.ask()
    cfg = compose_config(small_run_overrides + [
        "training.epochs=4", "training.subset_size=8", "training.val_subset_size=8",
        "training.early_stop.patience=1", "training.early_stop.min_delta=1.0",
        "trial.study_name=s", f"trial.storage={url}", f"trial.number={trial.number}",
    ])
    best = make_trainer(Plan(cfg, tmp_path / "trial_0")).fit()
    stored = study.trials[0]
    assert list(stored.intermediate_values) == [1, 2]
    assert attrs.PRUNED_AT not in stored.user_attrs
    job = JobReturn()
    job.status, job._return_value = JobStatus.COMPLETED, best
    outcome = judge(job, stored)
    assert (outcome.state, outcome.value) == (TrialState.COMPLETE, best)
