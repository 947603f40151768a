"""What a sweep leaves next to its trial directories: `trials.csv` and the best trial's re-run recipe.

Both are rewritten from the study after every batch, so they always agree with it and
survive a sweep that is killed halfway.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import yaml
from optuna.trial import FrozenTrial, TrialState

from detr_train.checkpointing.atomic import atomic_write
from detr_train.search import attrs
from detr_train.search.overrides import override

TRIALS_CSV = "trials.csv"
BEST_TRIAL_YAML = "best_trial.yaml"
RERUN_BEST_SCRIPT = "rerun_best.sh"

_BASE_COLUMNS = ["number", "state", "value"]
_TAIL_COLUMNS = ["map_history", "epochs_run", "pruned_at_epoch", "duration_s", "datetime_start", "run_dir", "error"]
# Overrides that belong to the search itself and must not be in a full-budget re-run.
_SEARCH_ONLY_KEYS = ("search", "budget", "trial")


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, value, `params_<key>` per parameter, then the
    per-epoch history (JSON `{epoch: value}`), epochs run, duration and run directory."""
    trials = study.get_trials(deepcopy=False)
    param_columns = _unique(f"params_{key}" for trial in trials for key in trial.params)
    rows = [_row(trial) for trial in trials]
    frame = pd.DataFrame(rows, columns=_BASE_COLUMNS + param_columns + _TAIL_COLUMNS)
    # Whole epochs, blank where a trial was not pruned (not 2.0 next to NaN).
    frame["pruned_at_epoch"] = frame["pruned_at_epoch"].astype("Int64")
    return frame


def write_trials_csv(study: optuna.Study, sweep_dir: Path) -> Path:
    path = Path(sweep_dir) / TRIALS_CSV
    atomic_write(path, trials_frame(study).to_csv(index=False))
    return path


def write_best_trial(
    study: optuna.Study, sweep_dir: Path, fixed_overrides: Mapping[str, str], full_budget: Iterable[str]
) -> Path | None:
    """`best_trial.yaml` (what the best trial was and how to re-run it) and `rerun_best.sh`.

    The re-run keeps the sweep's fixed overrides and the best parameters, drops the
    search-only ones (`search=`, `budget=`, `trial.*`) and appends `full_budget`
    (`budget=none` for detr-train). Returns None while no trial has completed.
    """
    best = best_trial(study)
    if best is None:
        return None
    overrides = rerun_overrides(fixed_overrides, best.params, full_budget)
    command = shlex.join(program_invocation() + overrides)
    run_dir = best.user_attrs.get(attrs.RUN_DIR)
    summary = {
        "study_name": study.study_name,
        "trial": best.number,
        "value": best.value,
        "direction": study.direction.name.lower(),
        "params": dict(best.params),
        "run_dir": run_dir,
        "config": str(Path(run_dir) / ".hydra" / "config.yaml") if run_dir else None,
        "overrides": overrides,
        "command": command,
    }
    header = (
        f"# Best trial of study '{study.study_name}': trial {best.number}, value {best.value:.6g}.\n"
        f"# Re-run it at full budget:  sh {Path(sweep_dir) / RERUN_BEST_SCRIPT}\n"
        f"#   or:  {command}\n"
    )
    sweep_dir = Path(sweep_dir)
    atomic_write(sweep_dir / BEST_TRIAL_YAML, header + yaml.safe_dump(summary, sort_keys=False))
    script = f"#!/bin/sh\n# Trial {best.number} of study '{study.study_name}' at full budget.\nexec {command} \"$@\"\n"
    atomic_write(sweep_dir / RERUN_BEST_SCRIPT, script, executable=True)
    return sweep_dir / BEST_TRIAL_YAML


def rerun_overrides(fixed_overrides: Mapping[str, str], params: Mapping[str, Any], full_budget: Iterable[str]) -> list[str]:
    kept = [line for key, line in fixed_overrides.items() if not _is_search_only(key)]
    return kept + [override(key, value) for key, value in params.items()] + list(full_budget)


def program_invocation() -> list[str]:
    """How this program was started, as the head of a command line: `detr-train`,
    `python -m detr_train` or `python path/to/app.py`."""
    script = sys.argv[0] if sys.argv and sys.argv[0] else "detr-train"
    path = Path(script)
    if path.name == "__main__.py":
        return ["python", "-m", path.parent.name]
    if path.suffix == ".py":
        return ["python", script]
    return [path.name]


def _row(trial: FrozenTrial) -> dict[str, Any]:
    history = {int(step): float(value) for step, value in sorted(trial.intermediate_values.items())}
    return {
        "number": trial.number,
        "state": trial.state.name,
        "value": trial.value,
        **{f"params_{key}": value for key, value in trial.params.items()},
        "map_history": json.dumps(history),
        "epochs_run": max(history, default=0),
        "pruned_at_epoch": trial.user_attrs.get(attrs.PRUNED_AT),
        "duration_s": trial.duration.total_seconds() if trial.duration is not None else None,
        "datetime_start": trial.datetime_start.isoformat(timespec="seconds") if trial.datetime_start else None,
        "run_dir": trial.user_attrs.get(attrs.RUN_DIR),
        "error": trial.user_attrs.get(attrs.ERROR),
    }


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The study's best completed trial, or None while none has completed."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    return study.best_trial


def _is_search_only(key: str) -> bool:
    name = key.lstrip("+~")
    return any(name == prefix or name.startswith(prefix + ".") for prefix in _SEARCH_ONLY_KEYS)


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))
