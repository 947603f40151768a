"""The sweeper with Hydra's parallel and cluster launchers: jobs in other processes, one study.

The joblib case (several worker processes, pruning across them) is in test_search_storage.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from optuna.trial import TrialState
from search_app.harness import load_study, read_trials_csv, run_app

from detr_train.config import config_dir

pytestmark = [pytest.mark.slow, pytest.mark.sweep]

SPACE = ("x=interval(0, 1)", "y=interval(0, 1)", "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=0")


def _check_one_study_and_its_csv(sweep_dir: Path, n_trials: int) -> list[dict]:
    """Every trial is in the study, finished, and in trials.csv as the study says; returns the job records."""
    study = load_study(sweep_dir)
    assert [t.number for t in study.trials] == list(range(n_trials))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    table = read_trials_csv(sweep_dir)
    assert list(table["number"]) == list(range(n_trials))
    assert list(table["state"]) == [t.state.name for t in study.trials]
    for trial, value in zip(study.trials, table["value"]):
        assert value == pytest.approx(trial.value)
    jobs = [json.loads((sweep_dir / f"trial_{n}" / "job.json").read_text()) for n in range(n_trials)]
    # Each directory holds its own trial's job, run with that trial's parameters.
    assert [job["trial"] for job in jobs] == list(range(n_trials))
    assert [(job["x"], job["y"]) for job in jobs] == [(t.params["x"], t.params["y"]) for t in study.trials]
    return jobs


def test_submitit_local_runs_each_trial_in_its_own_process_into_one_study(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep_dir = tmp_path / "sweep"
    run_app(
        sweep_dir, *SPACE, "epochs=2", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=2",
        "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=3",
    )
    jobs = _check_one_study_and_its_csv(sweep_dir, 3)
    # The basic launcher runs every job in the sweep's process: three pids are three processes.
    assert len({job["pid"] for job in jobs}) == 3
    assert (sweep_dir / ".submitit").is_dir()  # submitit's own logs stay inside the sweep


def test_joblib_with_two_workers_and_one_job_at_a_time_records_every_trial(tmp_path):
    # n_jobs differ: the sweeper launches 3 at a time on a 2-worker pool, so batches queue.
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep_dir = tmp_path / "sweep"
    run_app(
        sweep_dir, *SPACE, "epochs=2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
        "hydra.sweeper.n_jobs=3", "hydra.sweeper.n_trials=5",
    )
    _check_one_study_and_its_csv(sweep_dir, 5)


def test_the_slurm_preset_composes_with_a_search_preset():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["search=lr", "hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.max_num_timeout, launcher.gpus_per_node, launcher.partition) == (3, 1, "gpu")
    assert launcher.signal_delay_s > 0
    assert cfg.hydra.sweeper.n_trials == 12  # the search preset is untouched

