"""The sweeper against a plain Optuna loop, with a cheap objective app (no DETR).

Same sampler seed, same pruner, same intermediate values: the sweep (jobs reporting from
Hydra jobs through `reporter_for`) must sample, prune and record exactly as
`study.optimize` does, and write what it recorded to trials.csv.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from search_app.harness import load_study, read_trials_csv, run_app
from search_app.objective import value_at

pytestmark = [pytest.mark.slow, pytest.mark.sweep]

N_TRIALS = 10
EPOCHS = 4
SEED = 3
TPE_STARTUP = 4
PRUNER_STARTUP = 2
WARMUP = 2


def _plain_optuna_study() -> optuna.Study:
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=SEED, n_startup_trials=TPE_STARTUP),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP, n_warmup_steps=WARMUP),
    )

    def objective(trial: optuna.Trial) -> float:
        x, y = trial.suggest_float("x", 0, 1), trial.suggest_float("y", 0, 1)
        best = -math.inf
        for epoch in range(1, EPOCHS + 1):
            value = value_at(x, y, epoch)
            best = max(best, value)
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return best

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=N_TRIALS)
    return study


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> Path:
    sweep_dir = tmp_path_factory.mktemp("pruning") / "sweep"
    run_app(
        sweep_dir,
        "x=interval(0, 1)",
        "y=interval(0, 1)",
        f"epochs={EPOCHS}",
        f"hydra.sweeper.n_trials={N_TRIALS}",
        f"hydra.sweeper.sampler.seed={SEED}",
        f"hydra.sweeper.sampler.n_startup_trials={TPE_STARTUP}",
        f"hydra.sweeper.pruner.n_startup_trials={PRUNER_STARTUP}",
        f"hydra.sweeper.pruner.n_warmup_steps={WARMUP}",
    )
    return sweep_dir


def _summary(study: optuna.Study) -> list[tuple]:
    return [(t.number, t.state, t.params, t.intermediate_values, t.value) for t in study.trials]


def test_sweep_samples_and_prunes_exactly_like_a_plain_optuna_loop(swept):
    sweep_study, plain_study = load_study(swept), _plain_optuna_study()
    assert _summary(sweep_study) == _summary(plain_study)
    states = [t.state for t in sweep_study.trials]
    assert TrialState.PRUNED in states and TrialState.COMPLETE in states  # the comparison means something
    assert TrialState.FAIL not in states


def test_pruned_trials_are_pruned_in_the_study_in_trials_csv_and_in_their_jobs(swept):
    study, frame = load_study(swept), read_trials_csv(swept)
    assert list(frame["number"]) == [t.number for t in study.trials]
    assert list(frame["state"]) == [t.state.name for t in study.trials]
    for trial, row in zip(study.trials, frame.itertuples()):
        job = json.loads((swept / f"trial_{trial.number}" / "job.json").read_text())
        assert row.run_dir == str(swept / f"trial_{trial.number}")
        assert job["epochs_run"] == row.epochs_run == max(trial.intermediate_values)
        assert {int(k): v for k, v in json.loads(row.map_history).items()} == trial.intermediate_values
        assert row.params_x == pytest.approx(trial.params["x"], rel=1e-15) and row.params_y == pytest.approx(trial.params["y"], rel=1e-15)
        assert row.duration_s > 0
        if trial.state == TrialState.PRUNED:
            assert row.pruned_at_epoch == row.epochs_run < EPOCHS
        else:
            assert math.isnan(row.pruned_at_epoch) and row.epochs_run == EPOCHS
            assert row.value == pytest.approx(job["best"])


def test_best_trial_file_and_plots_agree_with_the_study(swept):
    import yaml

    study = load_study(swept)
    best = yaml.safe_load((swept / "best_trial.yaml").read_text())
    assert best["trial"] == study.best_trial.number and best["value"] == study.best_value
    assert best["params"] == study.best_trial.params
    assert "trial.number" not in best["command"] and f"x={study.best_trial.params['x']!r}" in best["command"]
    assert (swept / "rerun_best.sh").read_text().count(best["command"]) == 1
    for name in ("optimization_history.png", "intermediate_values.png", "param_importances.png"):
        assert (swept / "plots" / name).stat().st_size > 1000


def test_a_crashing_trial_is_failed_logged_and_the_sweep_goes_on(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # With the random sampler at seed 0, trial 4 (and only it among the first 6) has x > 0.9.
    result = run_app(
        sweep_dir, "x=interval(0, 1)", "y=interval(0, 1)", "crash_above_x=0.9",
        "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=0", "hydra.sweeper.n_trials=6",
        "hydra/sweeper/pruner=nop",
    )
    states = [t.state for t in load_study(sweep_dir).trials]
    assert states == [TrialState.COMPLETE] * 4 + [TrialState.FAIL] + [TrialState.COMPLETE]
    log = result.stdout + result.stderr
    assert "Trial 4 failed: RuntimeError: deliberate crash" in log
    assert "Traceback" in log
    frame = read_trials_csv(sweep_dir)
    assert frame.loc[4, "state"] == "FAIL" and "deliberate crash" in frame.loc[4, "error"]


def test_too_many_failures_stop_the_sweep_with_a_clear_error(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_app(
        sweep_dir, "x=interval(0, 1)", "y=interval(0, 1)", "crash_above_x=0.9",
        "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=0", "hydra.sweeper.n_trials=6",
        "hydra.sweeper.max_failure_rate=0.0", check=False,
    )
    assert result.returncode != 0
    assert "1 of the 6 trials planned have failed, more than hydra.sweeper.max_failure_rate=0.0 allows" in result.stderr
    assert "Traceback" not in result.stderr  # Hydra prints our error as a message, not a stack
    assert [t.state for t in load_study(sweep_dir).trials] == [TrialState.COMPLETE] * 4 + [TrialState.FAIL]
    assert len(read_trials_csv(sweep_dir)) == 5  # written before giving up
