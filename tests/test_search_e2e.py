"""End to end: a real `detr-train search=lr` on synthetic data, tiny model, tiny budget.

Two trials on a grid over the learning rate: one that learns (mAP > 0 after an epoch) and
one that cannot (lr=1e-8). With the median pruner judging from epoch 1 after one finished
trial, the second is pruned; everything the sweep writes must agree with the study.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

from detr_train.search.storage import open_storage

pytestmark = [pytest.mark.slow, pytest.mark.sweep]

GOOD_LR, DEAD_LR = 3e-3, 1e-8


def _detr_train(*overrides: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "detr_train", *overrides], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("detr_search")
    result = _detr_train(
        "search=lr",
        "budget=tiny",
        f"output_root={root / 'outputs'}",
        f"data.root={root / 'synthetic'}",
        "data.generate.num_train=48",
        "data.generate.num_val=24",
        "data.num_workers=0",
        "model.num_queries=10",  # pins the preset's query-count sweep (the last definition wins)
        "training.batch_size=2",
        "training.schedule.warmup_steps=0",
        f"training.lr=choice({GOOD_LR}, {DEAD_LR})",  # replaces the preset's lr interval
        "training.weight_decay=1e-4",
        "training.backbone_lr_mult=0.1",
        "hydra/sweeper/sampler=grid",
        "hydra.sweeper.sampler.seed=1",  # grid order: the good lr first
        "hydra.sweeper.n_trials=2",
        "hydra/sweeper/pruner=median",  # the preset halves; this test pins the median rule
        "hydra.sweeper.pruner.n_startup_trials=1",
        "hydra.sweeper.pruner.n_warmup_steps=1",
        cwd=root,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    sweep_dir = root / "outputs" / "default" / "search" / "lr_tiny"
    (sweep_dir / "sweep_output.txt").write_text(result.stdout + result.stderr)
    return sweep_dir


def test_the_search_ends_naming_its_best_trial_and_what_to_run_next(sweep):
    study = optuna.load_study(study_name="lr_tiny", storage=open_storage(str(sweep / "optuna_journal.log")))
    best = study.best_trial
    run_dir = best.user_attrs["detr_train.run_dir"]
    output = (sweep / "sweep_output.txt").read_text()
    tail = output[output.rindex(f"Best trial {best.number}"):]
    best_epoch = max(best.intermediate_values, key=best.intermediate_values.get)
    for expected in (f"(mAP {best.value:.4f}); every trial: {sweep / 'trials.csv'}",
                     f"Run directory: {run_dir}", f"Best validation mAP {best.value:.4f} at epoch {best_epoch}",
                     f"detr-train-eval {run_dir}", f"detr-train-predict {run_dir} {sweep.parents[3] / 'synthetic' / 'val'}"):
        assert expected in tail, (expected, tail)


def test_the_search_prunes_the_weak_trial_and_records_it(sweep):
    study = optuna.load_study(study_name="lr_tiny", storage=open_storage(str(sweep / "optuna_journal.log")))
    good, dead = study.trials
    assert good.params["training.lr"] == GOOD_LR and good.state == TrialState.COMPLETE
    assert dead.params["training.lr"] == DEAD_LR and dead.state == TrialState.PRUNED
    assert good.value > 0
    assert len(good.intermediate_values) == 3  # budget=tiny: 3 epochs
    assert dead.user_attrs["detr_train.pruned_at"] == max(dead.intermediate_values)


def test_trials_csv_best_trial_and_plots_agree_with_the_study(sweep):
    study = optuna.load_study(study_name="lr_tiny", storage=open_storage(str(sweep / "optuna_journal.log")))
    frame = pd.read_csv(sweep / "trials.csv")
    assert list(frame["state"]) == [t.state.name for t in study.trials]
    for trial, row in zip(study.trials, frame.itertuples()):
        run_dir = Path(row.run_dir)
        assert run_dir == sweep / f"trial_{trial.number}"
        epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        # The trainer's own metric log, the study and trials.csv tell the same story.
        assert {e["epoch"]: e["map"] for e in epochs} == trial.intermediate_values
        assert {int(k): v for k, v in json.loads(row.map_history).items()} == trial.intermediate_values
        assert row.epochs_run == len(epochs)
    best = yaml.safe_load((sweep / "best_trial.yaml").read_text())
    assert best["trial"] == study.best_trial.number == 0 and best["value"] == study.best_value
    assert "budget=none" in best["overrides"] and not any(o.startswith(("search=", "trial.")) for o in best["overrides"])
    for name in ("optimization_history.png", "intermediate_values.png"):
        assert (sweep / "plots" / name).is_file()


def test_the_best_trial_command_composes_its_config_at_full_budget(sweep, tmp_path):
    best = yaml.safe_load((sweep / "best_trial.yaml").read_text())
    result = _detr_train(*best["overrides"], "--cfg", "job", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    job = yaml.safe_load(result.stdout)
    assert job["training"]["lr"] == GOOD_LR
    assert job["budget"]["max_epochs"] is None
    assert job["trial"]["number"] is None


def test_sigterm_to_a_running_sweep_stops_it_and_the_same_command_resumes_the_study(tmp_path):
    import signal
    import time

    from detr_train.search import attrs

    overrides = [
        "search=lr", "budget=tiny",
        f"output_root={tmp_path / 'outputs'}", f"data.root={tmp_path / 'synthetic'}",
        "data.generate.num_train=48", "data.generate.num_val=24", "data.num_workers=0",
        "training.batch_size=4", "training.schedule.warmup_steps=0", "training.progress=false",
        "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.seed=3",
    ]
    sweep_dir = tmp_path / "outputs" / "default" / "search" / "lr_tiny"
    process = subprocess.Popen([sys.executable, "-m", "detr_train", *overrides], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (sweep_dir / "trial_0" / "metrics.jsonl").is_file():
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)  # mid trial 0: after its first epoch, before its last
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0
    assert "were interrupted and recorded FAIL" in output and "Run the same command again" in output

    storage = open_storage(str(sweep_dir / "optuna_journal.log"))
    (stopped,) = optuna.load_study(study_name="lr_tiny", storage=storage).trials
    assert stopped.state == TrialState.FAIL and "SIGTERM" in stopped.user_attrs[attrs.INTERRUPTED]
    assert (sweep_dir / "trial_0" / "checkpoints" / "last.pt").is_file()
    stopped_metrics = (sweep_dir / "trial_0" / "metrics.jsonl").read_text()

    resumed = _detr_train(*overrides, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    trials = optuna.load_study(study_name="lr_tiny", storage=open_storage(str(sweep_dir / "optuna_journal.log"))).trials
    # The interrupted trial stays as it was and does not count: two more trials run, numbered on.
    assert [t.number for t in trials] == [0, 1, 2]
    assert trials[0].state == TrialState.FAIL
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials[1:])
    assert (sweep_dir / "trial_0" / "metrics.jsonl").read_text() == stopped_metrics
    assert list(pd.read_csv(sweep_dir / "trials.csv")["number"]) == [0, 1, 2]
