"""The study's storage: resuming a sweep, other storages, jobs in other processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from optuna.trial import TrialState
from search_app.harness import load_study, read_trials_csv, run_app

from detr_train.search.storage import redact, resolve_storage_url

pytestmark = [pytest.mark.slow, pytest.mark.sweep]

SPACE = ("x=interval(0, 1)", "y=interval(0, 1)", "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=0")


def _jobs(sweep_dir: Path) -> dict[str, tuple[str, int]]:
    """Each trial directory's job record and its modification time: what 'not overwritten' means."""
    return {
        path.parent.name: (path.read_text(), path.stat().st_mtime_ns)
        for path in sorted(sweep_dir.glob("trial_*/job.json"))
    }


@pytest.mark.parametrize("storage", ["default journal", "sqlite"])
def test_a_rerun_resumes_the_study_numbering_on_and_keeping_every_directory(tmp_path, storage):
    sweep_dir = tmp_path / "sweep"
    extra = [f"hydra.sweeper.storage=sqlite:///{tmp_path / 'study.db'}"] if storage == "sqlite" else []
    url = f"sqlite:///{tmp_path / 'study.db'}" if storage == "sqlite" else None

    run_app(sweep_dir, *SPACE, *extra, "hydra.sweeper.n_trials=3")
    first = _jobs(sweep_dir)
    assert sorted(first) == ["trial_0", "trial_1", "trial_2"]

    # n_trials is the study's target: raising it to 5 runs the 2 missing trials.
    result = run_app(sweep_dir, *SPACE, *extra, "hydra.sweeper.n_trials=5")
    assert "3 trials stored, n_trials=5: running 2 now" in result.stdout
    study = load_study(sweep_dir, storage=url)
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4]
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    after = _jobs(sweep_dir)
    assert sorted(after) == [f"trial_{n}" for n in range(5)]
    assert {name: after[name] for name in first} == first  # untouched: same content, same mtime
    assert [json.loads(after[f"trial_{n}"][0])["trial"] for n in range(5)] == [0, 1, 2, 3, 4]
    # The resumed sampler does not replay the first run's random draws.
    first_params = {(t.params["x"], t.params["y"]) for t in study.trials[:3]}
    assert not first_params & {(t.params["x"], t.params["y"]) for t in study.trials[3:]}
    assert list(read_trials_csv(sweep_dir)["number"]) == [0, 1, 2, 3, 4]

    if storage == "default journal":
        # The very same command again: the study is complete, nothing runs, nothing changes.
        result = run_app(sweep_dir, *SPACE, "hydra.sweeper.n_trials=5")
        assert "5 trials stored, n_trials=5: running 0 now" in result.stdout
        assert _jobs(sweep_dir) == after
        assert len(load_study(sweep_dir).trials) == 5


def test_an_interrupted_trial_stops_the_sweep_and_a_rerun_replaces_it(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_app(sweep_dir, *SPACE, "hydra.sweeper.n_trials=3", "interrupt_trial=1", check=False)
    assert result.returncode == 1
    assert "Trial(s) [1] were interrupted and recorded FAIL" in result.stderr
    assert [t.state for t in load_study(sweep_dir).trials] == [TrialState.COMPLETE, TrialState.FAIL]
    assert read_trials_csv(sweep_dir).loc[1, "error"] == "interrupted: SIGTERM"

    run_app(sweep_dir, *SPACE, "hydra.sweeper.n_trials=3")
    states = [t.state for t in load_study(sweep_dir).trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]


def test_a_resumed_study_must_keep_its_search_space_kinds_and_direction(tmp_path):
    sweep_dir = tmp_path / "sweep"
    run_app(sweep_dir, *SPACE, "hydra.sweeper.n_trials=1")
    for change, message in [
        (("x=choice(0.1, 0.2)", "y=interval(0, 1)"), "already sampled 'x' from FloatDistribution"),
        ((*SPACE, "hydra.sweeper.direction=minimize"), "was created to maximize, but hydra.sweeper.direction=minimize"),
    ]:
        result = run_app(sweep_dir, *change, "hydra.sweeper.n_trials=2", check=False)
        assert result.returncode == 2 and message in result.stderr
    assert len(load_study(sweep_dir).trials) == 1


def test_jobs_in_separate_processes_report_to_one_study(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep_dir = tmp_path / "sweep"
    run_app(
        sweep_dir, *SPACE, "epochs=3",
        "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=4",
        "hydra/sweeper/pruner=threshold", "hydra.sweeper.pruner.lower=0.5", "hydra.sweeper.pruner.n_warmup_steps=1",
    )
    study = load_study(sweep_dir)
    jobs = [json.loads((sweep_dir / f"trial_{t.number}" / "job.json").read_text()) for t in study.trials]
    assert [job["trial"] for job in jobs] == [0, 1, 2, 3]
    assert len({job["pid"] for job in jobs}) >= 2  # really other processes
    for trial, job in zip(study.trials, jobs):
        # Every epoch a worker reported arrived in the study, and its pruning decision with it.
        assert len(trial.intermediate_values) == job["epochs_run"]
        assert trial.state == (TrialState.PRUNED if job["epochs_run"] < 3 else TrialState.COMPLETE)
    assert TrialState.PRUNED in {t.state for t in study.trials}  # threshold 0.5 at epoch 1 prunes some


def test_storage_strings_are_made_absolute_for_jobs_in_other_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_storage_url(None, Path("sweeps/a")) == str(tmp_path / "sweeps/a/optuna_journal.log")
    assert resolve_storage_url("study.log", Path("x")) == str(tmp_path / "study.log")
    assert resolve_storage_url("sqlite:///study.db", Path("x")) == f"sqlite:///{tmp_path / 'study.db'}"
    assert resolve_storage_url("sqlite:////abs/study.db", Path("x")) == "sqlite:////abs/study.db"
    assert resolve_storage_url("postgresql+psycopg2://u:pw@db/optuna", Path("x")) == "postgresql+psycopg2://u:pw@db/optuna"


def test_a_bare_postgresql_url_names_the_installed_driver(monkeypatch):
    import importlib.util

    installed = {"psycopg2"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name in installed else None)
    assert resolve_storage_url("postgresql://u:pw@db/optuna", Path("x")) == "postgresql+psycopg2://u:pw@db/optuna"
    installed.add("psycopg")
    assert resolve_storage_url("postgres://u@db/optuna", Path("x")) == "postgresql+psycopg://u@db/optuna"
    installed.clear()  # no driver: left alone, and opening it says what to install
    assert resolve_storage_url("postgresql://u@db/optuna", Path("x")) == "postgresql://u@db/optuna"
    assert "pw" not in redact("postgresql://u:pw@db/optuna")
