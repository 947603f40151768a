"""The search presets compose with detr-train's real config: every searched key and choice exists.

`hydra.sweeper.n_trials=0` runs the sweeper's checks and opens the study without training.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from detr_train.config import config_dir

PRESETS = sorted(p.stem for p in (config_dir() / "search").glob("*.yaml"))


def _detr_train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "detr_train", f"output_root={tmp_path / 'outputs'}", *overrides]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.sweep
@pytest.mark.parametrize("preset", PRESETS)
def test_a_preset_passes_the_sweepers_checks_against_the_real_config(tmp_path, preset):
    result = _detr_train(tmp_path, f"search={preset}", "hydra.sweeper.n_trials=0")
    assert result.returncode == 0, result.stderr
    sweep_dirs = list((tmp_path / "outputs" / "default" / "search").iterdir())
    assert len(sweep_dirs) == 1 and (sweep_dirs[0] / "optuna_journal.log").is_file()
    assert "0 trials stored, n_trials=0: running 0 now" in result.stdout


@pytest.mark.slow
@pytest.mark.sweep
def test_other_samplers_and_pruners_swap_in_without_clashing_with_the_preset(tmp_path):
    result = _detr_train(
        tmp_path, "search=lr", "hydra/sweeper/sampler=random", "hydra/sweeper/pruner=hyperband", "hydra.sweeper.n_trials=0"
    )
    assert result.returncode == 0, result.stderr
    assert "Sampler RandomSampler, pruner optuna.pruners.HyperbandPruner" in result.stdout


@pytest.mark.slow
@pytest.mark.sweep
def test_a_misspelt_key_in_a_search_is_refused_before_any_trial(tmp_path):
    result = _detr_train(tmp_path, "search=lr", "training.lrr=tag(log, interval(1e-5, 1e-3))")
    assert result.returncode == 2
    assert "The search space does not fit the config: Could not override 'training.lrr'" in result.stderr
    assert not list(tmp_path.rglob("trial_*"))


@pytest.mark.parametrize(("budget", "trial_epochs"), [("small", 5), ("tiny", 3)])
def test_an_lr_trial_trains_the_budgets_epochs(budget, trial_epochs):
    """search=lr budget=small is the seed design's 5-epoch screening trial, not the default
    training length (4); a smaller budget still caps it."""
    from hydra import compose, initialize_config_dir

    from detr_train.training.trainer import epochs_to_train

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["search=lr", f"budget={budget}"])
    assert epochs_to_train(cfg) == trial_epochs
