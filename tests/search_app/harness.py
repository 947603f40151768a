"""Run the cheap objective app as a real Hydra multirun (a subprocess, like a user would) and read back its study."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd

from detr_train.search.storage import DEFAULT_JOURNAL_NAME, open_storage

APP = Path(__file__).resolve().parent / "app.py"


def run_app(sweep_dir: Path, *overrides: str, check: bool = True, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python app.py -m hydra.sweep.dir=<sweep_dir> <overrides>`, run from the sweep's parent folder."""
    sweep_dir.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(APP), "-m", f"hydra.sweep.dir={sweep_dir}", *overrides]
    result = subprocess.run(command, cwd=sweep_dir.parent, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"sweep failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def load_study(sweep_dir: Path, study_name: str | None = None, storage: str | None = None) -> optuna.Study:
    """The study a sweep left behind (by default: the journal file in the sweep dir, named after the dir)."""
    url = storage or str(sweep_dir / DEFAULT_JOURNAL_NAME)
    return optuna.load_study(study_name=study_name or sweep_dir.name, storage=open_storage(url))


def read_trials_csv(sweep_dir: Path) -> pd.DataFrame:
    return pd.read_csv(sweep_dir / "trials.csv")
