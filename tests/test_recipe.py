"""The training recipe's state: EMA weights and early stopping, checkpointed and resumed exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from detr_train.checkpointing import format as ckpt
from detr_train.checkpointing.plan import Plan, plan
from detr_train.training.callbacks import EarlyStopping, EpochResult
from detr_train.training.trainer import Trainer
from tests.conftest import compose_config, make_trainer

# A step schedule depends on the step only, so "2 epochs, then 2 more" is the same run as "4".
EXACT = ["training.schedule.name=step", "training.schedule.step_epochs=[3]", "training.val_subset_size=8",
         "training.subset_size=24"]
EMA = ["training.ema.enabled=true", "training.ema.decay=0.9", "training.ema.warmup_steps=3",
       "training.ema.eval_raw=true"]
TIMING = {"epoch_time", "eval_time", "raw_eval_time", "data_wait_fraction"}


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def _resumed(overrides: list[str], run_dir: Path) -> Trainer:
    the_plan = plan(compose_config(overrides + [f"training.resume={run_dir}"]), run_dir)
    trainer = make_trainer(the_plan)
    trainer.fit()
    return trainer


@pytest.mark.slow
def test_ema_two_epochs_then_resume_equals_four_straight(small_run_overrides, tmp_path):
    overrides = small_run_overrides + EXACT + EMA
    straight = make_trainer(Plan(compose_config(overrides + ["training.epochs=4"]), tmp_path / "straight"))
    straight.fit()
    make_trainer(Plan(compose_config(overrides + ["training.epochs=2"]), tmp_path / "split")).fit()
    resumed = _resumed(overrides + ["training.epochs=4"], tmp_path / "split")

    assert _records(resumed.run_dir) == _records(straight.run_dir)
    for (name, a), b in zip(straight.ema.module.state_dict().items(), resumed.ema.module.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.ema.updates == straight.ema.updates == 4 * 6
    records = _records(straight.run_dir)
    # The EMA is what is scored (map), the raw weights beside it; the best of either counts.
    assert all({"map", "raw_map", "raw_map_per_class"} <= set(r) for r in records)
    assert straight.state.best_metric == max(max(r["map"], r["raw_map"]) for r in records)
    assert not any(torch.equal(a, b) for a, b in zip(straight.ema.module.parameters(), straight.model.parameters()))


@pytest.mark.slow
def test_a_checkpoint_without_ema_starts_the_average_at_its_weights(small_run_overrides, tmp_path):
    overrides = small_run_overrides + EXACT
    make_trainer(Plan(compose_config(overrides + ["training.epochs=1"]), tmp_path / "run")).fit()
    the_plan = plan(compose_config(overrides + EMA + ["training.epochs=2", f"training.resume={tmp_path / 'run'}"]),
                    tmp_path / "run")
    # EMA is a setting of the run (the checkpoint's config wins): switch it on as a new run would.
    the_plan.cfg.training.ema.enabled = True
    trainer = make_trainer(the_plan)
    for a, b in zip(trainer.ema.module.state_dict().values(), trainer.model.state_dict().values()):
        assert torch.equal(a, b)
    assert trainer.ema.updates == 0


class _Run:
    """The little of a Trainer that EarlyStopping looks at."""

    def __init__(self, epochs: int):
        self.epochs = epochs
        self.stop_request = None

    def request_stop(self, reason: str, *, interrupted: bool) -> None:
        self.stop_request = (reason, interrupted)


def _feed(callback: EarlyStopping, run: _Run, maps: list[float], first_epoch: int = 1) -> int | None:
    for epoch, value in enumerate(maps, start=first_epoch):
        callback.on_epoch_end(run, EpochResult(epoch, {"map": value}))
        if run.stop_request is not None:
            return epoch
    return None


def test_early_stop_fires_after_patience_evaluations_without_a_min_delta_gain():
    run = _Run(epochs=10)
    # 0.201 does not beat 0.2 by min_delta, 0.25 does; then three stale epochs.
    assert _feed(EarlyStopping(patience=3, min_delta=0.01), run, [0.1, 0.2, 0.201, 0.25, 0.24, 0.255, 0.2, 0.3]) == 7
    assert run.stop_request == ("early stop", False)  # a normal end, not an interruption
    # Never after the last epoch: the run ends there anyway.
    assert _feed(EarlyStopping(patience=1, min_delta=0.0), _Run(epochs=2), [0.3, 0.1]) is None


def test_the_early_stop_counter_survives_a_checkpoint():
    maps = [0.1, 0.2, 0.2, 0.19, 0.18, 0.3]
    straight = _feed(EarlyStopping(patience=3, min_delta=0.0), _Run(10), maps)
    first = EarlyStopping(patience=3, min_delta=0.0)
    assert _feed(first, _Run(10), maps[:3]) is None
    resumed = EarlyStopping(patience=3, min_delta=0.0)
    resumed.load_state_dict(first.state_dict())
    assert _feed(resumed, _Run(10), maps[3:], first_epoch=4) == straight == 5


@pytest.mark.slow
def test_a_run_stops_early_and_its_resume_keeps_the_count(small_run_overrides, tmp_path):
    # min_delta 1.0 can never be met: the first evaluation sets the best, each later one is stale.
    overrides = small_run_overrides + EXACT + ["training.early_stop.patience=2", "training.early_stop.min_delta=1.0"]
    make_trainer(Plan(compose_config(overrides + ["training.epochs=2"]), tmp_path / "run")).fit()
    saved = ckpt.load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert saved["early_stop"]["stale"] == 1
    resumed = _resumed(overrides + ["training.epochs=6"], tmp_path / "run")
    assert [r["epoch"] for r in _records(resumed.run_dir)] == [1, 2, 3]  # stale twice: epochs 2 and 3
    assert resumed.stop_request is not None and not resumed.stop_request.interrupted


@pytest.mark.slow
@pytest.mark.parametrize("ema", [False, True])
def test_the_export_holds_the_weights_that_scored_best(small_run_overrides, tmp_path, ema):
    from transformers import DeformableDetrForObjectDetection

    overrides = small_run_overrides + EXACT + ["training.epochs=2", "training.export_hf=true"] + (EMA if ema else [])
    trainer = make_trainer(Plan(compose_config(overrides), tmp_path / "run"))
    trainer.fit()
    best = ckpt.load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    source = trainer.state.best_weights
    expected = best["ema"]["weights"] if source == "ema" else best["model"]
    exported = DeformableDetrForObjectDetection.from_pretrained(tmp_path / "run" / "hf_model").state_dict()
    for name, value in expected.items():
        if name in exported:
            assert torch.equal(exported[name], value), name
