"""TensorBoard logging: records read back equal to what was logged; a clear error without the package."""

from __future__ import annotations

import sys

import pytest
import torch

from detr_train.reporting.tensorboard import (
    INSTALL_HINT,
    MissingDependencyError,
    TensorBoardWriter,
    record_scalars,
)


def _record(epoch: int) -> dict:
    return {
        "epoch": epoch, "global_step": 10 * epoch, "lr": 2e-4 / epoch, "image_size": 96,
        "train_loss": 1.5 / epoch, "train_loss_ce": 0.5, "train_loss_bbox": 0.25, "train_loss_giou": 0.75,
        "skipped_steps": 0, "input_hw": [96, 128], "data_wait_fraction": 0.125,
        "map": 0.25 * epoch, "map_50": 0.5, "map_small": None, "map_large": float("nan"),
        "map_per_class": {"cat": 0.375, "dog": -1.0, "bird": None},
        "epoch_time": 3.5, "eval_time": 0.75,
    }


EXPECTED_TAGS = {
    "lr", "data/image_size", "train/loss", "train/loss_ce", "train/loss_bbox", "train/loss_giou",
    "train/skipped_steps", "time/data_wait_fraction", "val/map", "val/map_50", "map_per_class/cat",
    "time/epoch_time", "time/eval_time",
}


def test_record_tags_are_stable_and_skip_non_scalars():
    tags = dict(record_scalars(_record(1)))
    assert set(tags) == EXPECTED_TAGS  # no input_hw, no None/NaN, no AP -1, no epoch/global_step
    assert tags["train/loss"] == 1.5 and tags["map_per_class/cat"] == 0.375


def test_scalars_and_images_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = [_record(1), _record(2)]
    with TensorBoardWriter(tmp_path / "tb") as writer:
        for record in records:
            assert writer.log_record(record) == len(EXPECTED_TAGS)
        writer.log_images("val/predictions", [torch.zeros((3, 20, 30), dtype=torch.uint8),
                                              torch.full((3, 16, 16), 255, dtype=torch.uint8)], step=20)

    accumulator = EventAccumulator(str(tmp_path / "tb"))
    accumulator.Reload()
    assert set(accumulator.Tags()["scalars"]) == EXPECTED_TAGS
    for record in records:
        expected = dict(record_scalars(record))
        for tag, value in expected.items():
            events = {event.step: event.value for event in accumulator.Scalars(tag)}
            # Default step is the record's global_step; values are stored as float32.
            assert events[record["global_step"]] == pytest.approx(value, rel=1e-6)
    assert set(accumulator.Tags()["images"]) == {"val/predictions/0", "val/predictions/1"}
    first = accumulator.Images("val/predictions/0")[0]
    assert (first.width, first.height, first.step) == (30, 20, 20)


def test_missing_tensorboard_raises_a_clear_error(monkeypatch, tmp_path):
    # None in sys.modules makes any import of these names fail, as if not installed.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(MissingDependencyError) as raised:
        TensorBoardWriter(tmp_path / "tb")
    assert str(raised.value) == INSTALL_HINT
    assert "pip install" in str(raised.value) and "\n" not in str(raised.value)
    assert isinstance(raised.value, RuntimeError)
    assert not (tmp_path / "tb").exists()
