"""kill -9 at any moment leaves a run that resumes and tells the truth.

A real `detr-train` process is killed with SIGKILL at seeded random moments, chosen on
observed progress (never on time): inside a checkpoint save (its temp file is on disk),
right after last.pt was replaced, right after an epoch was logged, while best.pt is being
copied. The same command is then started again each time (the run dir is fixed, so it
continues there), and finally left to finish. The result must be the uninterrupted run:
the same final weights, the same metrics.jsonl (timing fields aside), the same best.pt,
and no temp files left behind.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from detr_train.checkpointing import format as ckpt
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

TIMING = {"epoch_time", "eval_time", "data_wait_fraction"}
KILLS = 6


def _command(run_dir: Path, small_run_overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "detr_train", *small_run_overrides, f"hydra.run.dir={run_dir}",
            "training.epochs=4", "training.subset_size=16", "training.val_subset_size=8",
            "training.checkpoint.every_n_steps=1", "training.checkpoint.keep_last=2", "training.log_every=1",
            "training.schedule.name=step", "training.schedule.step_epochs=[2]", "data.num_workers=0",
            # The plain decoder: its mAP improves at more epochs of this short run, so best.pt is
            # rewritten often enough for every kind of kill moment to come.
            "model.with_box_refine=false", "model.two_stage=false"]


def _snapshot(run_dir: Path) -> dict:
    folder = run_dir / "checkpoints"
    files = list(folder.iterdir()) if folder.is_dir() else []
    last = folder / "last.pt"
    log = run_dir / "train.log"
    return {
        "temp": any(p.name.startswith(".last.pt.") for p in files),
        "best_temp": any(p.name.startswith(".best.pt.") for p in files),
        "last_mtime": last.stat().st_mtime_ns if last.exists() else None,
        "epochs_logged": (run_dir / "metrics.jsonl").read_text().count("\n") if (run_dir / "metrics.jsonl").exists() else 0,
        "steps_logged": log.read_text().count(" step ") if log.exists() else 0,
    }


def _moment_reached(kind: str, start: dict, now: dict) -> bool:
    if kind == "inside a save":
        return now["temp"] and now["steps_logged"] > start["steps_logged"]
    if kind == "right after last.pt":
        return now["last_mtime"] is not None and now["last_mtime"] != start["last_mtime"]
    if kind == "right after an epoch was logged":
        return now["epochs_logged"] > start["epochs_logged"]
    if kind == "while best.pt is copied":
        return now["best_temp"]
    # "mid-step": some steps after the restart, between saves
    return now["steps_logged"] >= start["steps_logged"] + 2


MOMENTS = ["inside a save", "right after last.pt", "right after an epoch was logged", "while best.pt is copied",
           "mid-step"]


def _kill_at(command: list[str], run_dir: Path, moment: str) -> bool:
    """Start the command and SIGKILL it at `moment`; False if the run finished first."""
    start = _snapshot(run_dir)
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while process.poll() is None and time.time() < deadline:
            if _moment_reached(moment, start, _snapshot(run_dir)):
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
                return True
            time.sleep(0.002)
        return False
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def _weights(path: Path) -> dict:
    return ckpt.load_checkpoint(path)[ckpt.STATE_MODEL]


def test_kill_9_at_random_moments_then_the_same_command_finishes_the_same_run(small_run_overrides, tmp_path):
    reference_dir = tmp_path / "reference"
    finished = subprocess.run(_command(reference_dir, small_run_overrides), cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]

    run_dir = tmp_path / "killed"
    command = _command(run_dir, small_run_overrides)
    # Every kind of moment once, in a seeded order, then seeded random ones.
    rng = random.Random(20261127)
    moments = rng.sample(MOMENTS, len(MOMENTS)) + [rng.choice(MOMENTS) for _ in range(KILLS - len(MOMENTS))]
    kills = []
    for moment in moments:
        if not _kill_at(command, run_dir, moment):
            break  # finished before the moment came: nothing left to interrupt
        kills.append(moment)
    assert kills == moments

    final = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]

    assert _records(run_dir) == _records(reference_dir)
    for name in ("last.pt", "best.pt"):
        expected, got = _weights(reference_dir / "checkpoints" / name), _weights(run_dir / "checkpoints" / name)
        assert all(torch.equal(expected[k], got[k]) for k in expected), name
    reference_best = ckpt.train_state_of(ckpt.load_checkpoint(reference_dir / "checkpoints" / "best.pt"))
    best = ckpt.train_state_of(ckpt.load_checkpoint(run_dir / "checkpoints" / "best.pt"))
    assert (best["epoch"], best["best_metric"]) == (reference_best["epoch"], reference_best["best_metric"])
    assert not [p for p in run_dir.rglob("*.tmp")]
    # Every checkpoint on disk is complete and loadable.
    for path in (run_dir / "checkpoints").iterdir():
        ckpt.load_checkpoint(path)
