"""Progressive resizing: the schedule is validated, and workers really produce each epoch's size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from detr_train.checkpointing.plan import Plan, plan
from detr_train.config.resize_schedule import ResizeScheduleError, validate_resize_schedule
from detr_train.training.resize import size_for_epoch
from tests.conftest import compose_config, make_trainer


def test_size_follows_the_seed_design_example():
    schedule = validate_resize_schedule([[1, 640], [20, 800], [40, 960]])
    sizes = {epoch: size_for_epoch(schedule, epoch, default=512) for epoch in (1, 19, 20, 39, 40, 100)}
    assert sizes == {1: 640, 19: 640, 20: 800, 39: 800, 40: 960, 100: 960}
    assert size_for_epoch([], 7, default=512) == 512


@pytest.mark.parametrize("schedule,match", [
    ([[1, 640], [30, 800], [20, 960]], "strictly increasing"),
    ([[1, 640], [1, 800]], "strictly increasing"),
    ([[1, 0]], "size must be positive"),
    ([[1, -5]], "size must be positive"),
    ([[5, 640]], "must start at epoch 1"),
    ([[0, 640]], "1-based"),
    ([640, 800], "not an integer \\[first_epoch, size\\] pair"),
    ([[1, 640, 3]], "not an integer \\[first_epoch, size\\] pair"),
    ([[1, "big"]], "not an integer"),
    ("640", "must be a list"),
    ([], "is empty"),
])
def test_malformed_schedules_fail_with_a_clear_error(schedule, match):
    with pytest.raises(ResizeScheduleError, match=match) as info:
        validate_resize_schedule(schedule)
    assert "training.resize_schedule" in str(info.value)


@pytest.mark.slow
def test_malformed_schedule_fails_before_training(small_run_overrides, tmp_path):
    cfg = compose_config(small_run_overrides + ["training.resize_schedule=[[2,64]]"])
    with pytest.raises(ResizeScheduleError, match="must start at epoch 1"):
        make_trainer(Plan(cfg, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def _input_sizes(run_dir: Path) -> dict[int, list[int]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["epoch"]: (r["image_size"], r["input_hw"]) for r in records}


@pytest.mark.slow
@pytest.mark.parametrize("persistent", [False, True])
def test_workers_produce_the_scheduled_size_across_a_resume(small_run_overrides, tmp_path, persistent):
    overrides = small_run_overrides + [
        "data.num_workers=2", f"data.persistent_workers={persistent}", "training.subset_size=8",
        "training.val_subset_size=4", "training.schedule.name=constant",
        "training.resize_schedule=[[1,64],[2,80],[3,48]]",
    ]
    run_dir = tmp_path / "run"
    make_trainer(Plan(compose_config(overrides + ["training.epochs=2"]), run_dir)).fit()
    # Resume lands after the switch at epoch 2: epoch 3 must use its own size.
    resumed_plan = plan(compose_config(overrides + ["training.epochs=3", f"training.resume={run_dir}"]), run_dir)
    resumed = make_trainer(resumed_plan)
    resumed.fit()
    assert _input_sizes(run_dir) == {1: (64, [64, 64]), 2: (80, [80, 80]), 3: (48, [48, 48])}
