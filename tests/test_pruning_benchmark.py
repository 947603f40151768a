"""benchmarks/pruning_savings.py refuses a stored baseline whose trials trained differently."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "pruning_savings.py"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("pruning_savings", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _sweep_dir(root: Path, name: str, epochs: int, pruner: str) -> Path:
    sweep_dir = root / name
    sweep_dir.mkdir()
    config = {
        "hydra": {"sweeper": {"pruner": {"_target_": pruner}}},
        "training": {"epochs": epochs, "lr": 1e-4},
        "data": {"root": "${output_root}/data"},
        "output_root": "outputs",
    }
    OmegaConf.save(OmegaConf.create(config), sweep_dir / "multirun.yaml")
    return sweep_dir


def test_a_baseline_whose_trials_differ_only_in_the_pruner_is_accepted(tmp_path: Path) -> None:
    benchmark = _load_benchmark()
    baseline = _sweep_dir(tmp_path, "unpruned", 5, "optuna.pruners.NopPruner")
    pruned = _sweep_dir(tmp_path, "pruned", 5, "optuna.pruners.SuccessiveHalvingPruner")

    benchmark.check_same_task(baseline, pruned)


def test_a_baseline_trained_for_other_epochs_is_refused_naming_the_key_and_file(tmp_path: Path) -> None:
    benchmark = _load_benchmark()
    baseline = _sweep_dir(tmp_path, "unpruned", 4, "optuna.pruners.NopPruner")
    pruned = _sweep_dir(tmp_path, "pruned", 5, "optuna.pruners.SuccessiveHalvingPruner")

    with pytest.raises(SystemExit, match=r"unpruned/multirun.yaml.*training\.epochs: 4 vs 5"):
        benchmark.check_same_task(baseline, pruned)
