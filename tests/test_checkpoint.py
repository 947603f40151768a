"""Checkpoint files: complete round trip, weights_only safety, atomic writes, clear errors."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from detr_train.checkpointing import format as ckpt
from detr_train.checkpointing.checkpointer import Checkpointer, Found, candidates, numbered_name
from detr_train.checkpointing.state import RngState, StrictWeights, TrainState

LEGACY_RUN = Path(__file__).parent / "data" / "legacy_format1_run"


def _stateful_parts():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return model, optimizer, scaler


def _checkpointer(run_dir: Path, model, optimizer, scaler, state: TrainState | None = None, **kwargs) -> Checkpointer:
    states = {ckpt.STATE_MODEL: StrictWeights(model), ckpt.STATE_OPTIMIZER: optimizer,
              ckpt.STATE_GRAD_SCALER: scaler, ckpt.STATE_TRAIN: state or TrainState(), ckpt.STATE_RNG: RngState()}
    metadata = {ckpt.KEY_FORMAT_VERSION: ckpt.FORMAT_VERSION, ckpt.KEY_CONFIG_YAML: "training:\n  epochs: 4\n",
                ckpt.KEY_CLASS_NAMES: ["a", "b"]}
    return Checkpointer(run_dir, states, metadata, **kwargs)


def _at(epoch: int, batch: int = 0, step: int = 0, best: tuple[float, int] = (-1.0, 0)) -> TrainState:
    state = TrainState(epoch=epoch, batch_in_epoch=batch, global_step=step)
    state.best_metric, state.best_epoch = best
    return state


def test_every_state_survives_a_round_trip(tmp_path):
    model, optimizer, scaler = _stateful_parts()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = _at(3, 5, 41, best=(0.37, 2))
    state.meter.add({"loss": 1.5})
    path = _checkpointer(tmp_path, model, optimizer, scaler, state).save()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    # Plain torch.load with weights_only=True must accept the file as is.
    torch.load(path, weights_only=True)

    fresh_model = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.AdamW(fresh_model.parameters(), lr=1e-3)
    fresh_scaler = torch.amp.GradScaler("cpu", enabled=True)
    fresh_state = TrainState()
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    _checkpointer(tmp_path, fresh_model, fresh_opt, fresh_scaler, fresh_state).restore(ckpt.load_checkpoint(path), path)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    for a, b in zip(model.state_dict().values(), fresh_model.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert fresh_scaler.get_scale() == 1024.0
    assert fresh_state == state
    assert ckpt.load_checkpoint(path)[ckpt.KEY_CONFIG_YAML].startswith("training:")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned_marker",))


def test_a_checkpoint_carrying_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 2, "model": _Exploit()}, path)
    with pytest.raises(ckpt.CheckpointError, match="refused.*posix.system") as info:
        ckpt.load_checkpoint(path)
    assert str(path) in str(info.value)
    assert not (tmp_path / "pwned_marker").exists()


def test_an_interrupted_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    model, optimizer, scaler = _stateful_parts()
    state = _at(1)
    checkpointer = _checkpointer(tmp_path, model, optimizer, scaler, state)
    path = checkpointer.save()
    state.epoch = 2

    def failing_save(obj, handle):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        checkpointer.save()
    monkeypatch.undo()
    assert ckpt.train_state_of(ckpt.load_checkpoint(path))["epoch"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp file left behind


def test_temp_files_of_a_killed_save_are_swept_when_a_run_starts(tmp_path):
    model, optimizer, scaler = _stateful_parts()
    checkpointer = _checkpointer(tmp_path, model, optimizer, scaler)
    checkpointer.save()
    (checkpointer.folder / ".last.pt.a1b2c3.tmp").write_bytes(b"PK half")
    checkpointer.sweep_temp_files()
    assert [p.name for p in checkpointer.folder.iterdir()] == ["last.pt"]


@pytest.mark.parametrize("damage,match", [
    ("missing", "checkpoint not found"),
    ("empty", "is empty"),
    ("truncated", "truncated or corrupted"),
    ("garbage", "truncated or corrupted"),
    ("not_ours", "not a complete detr_train checkpoint"),
])
def test_damaged_checkpoints_give_one_line_naming_the_file(tmp_path, damage, match):
    model, optimizer, scaler = _stateful_parts()
    path = tmp_path / "last.pt"
    good = _checkpointer(tmp_path / "good", model, optimizer, scaler).save().read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(2048))
    elif damage == "not_ours":
        torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ckpt.CheckpointError, match=match) as info:
        ckpt.load_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_model_mismatch_names_the_keys_and_loads_nothing(tmp_path):
    model, optimizer, scaler = _stateful_parts()
    path = _checkpointer(tmp_path, model, optimizer, scaler).save()
    wider = torch.nn.Linear(3, 5)
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    target = _checkpointer(tmp_path, wider, torch.optim.AdamW(wider.parameters()), torch.amp.GradScaler("cpu"))
    with pytest.raises(ckpt.CheckpointError, match=r"shape mismatch: .*weight \(2, 3\) vs \(5, 3\)") as info:
        target.restore(ckpt.load_checkpoint(path), path)
    assert "bias" in str(info.value) and str(path) in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in wider.state_dict().items())


def test_keep_last_keeps_the_newest_numbered_copies(tmp_path):
    model, optimizer, scaler = _stateful_parts()
    state = TrainState()
    checkpointer = _checkpointer(tmp_path, model, optimizer, scaler, state, keep_last=2)
    for epoch in range(1, 6):
        state.finish_epoch(epoch)
        checkpointer.save(epoch_end=epoch)
    assert sorted(p.name for p in checkpointer.folder.iterdir()) == ["epoch_0004.pt", "epoch_0005.pt", "last.pt"]
    assert [p.name for p in candidates(tmp_path)] == ["last.pt", "epoch_0005.pt", "epoch_0004.pt"]


def test_a_best_copy_lost_to_a_crash_is_restored_from_the_checkpoint_that_names_it(tmp_path):
    model, optimizer, scaler = _stateful_parts()
    state = TrainState()
    checkpointer = _checkpointer(tmp_path, model, optimizer, scaler, state)
    state.finish_epoch(1)
    state.observe(1, 0.2)
    checkpointer.save(is_best=True, epoch_end=1)
    # Epoch 2 is better, but the process dies between writing last.pt and copying it to best.pt.
    state.finish_epoch(2)
    state.observe(2, 0.3)
    checkpointer.save(is_best=False, epoch_end=2)
    assert ckpt.train_state_of(ckpt.load_checkpoint(checkpointer.best))["epoch"] == 1

    found = Found(checkpointer.last, ckpt.load_checkpoint(checkpointer.last))
    checkpointer.repair_best(found)
    repaired = ckpt.train_state_of(ckpt.load_checkpoint(checkpointer.best))
    assert (repaired["epoch"], repaired["best_epoch"], repaired["best_metric"]) == (2, 2, 0.3)
    # Missing altogether: restored the same way.
    checkpointer.best.unlink()
    checkpointer.repair_best(found)
    assert ckpt.train_state_of(ckpt.load_checkpoint(checkpointer.best))["epoch"] == 2


def test_a_format_1_checkpoint_is_upgraded_on_load():
    path = LEGACY_RUN / "checkpoints" / "last.pt"
    payload = ckpt.load_checkpoint(path)
    assert payload[ckpt.KEY_FORMAT_VERSION] == ckpt.FORMAT_VERSION
    assert "lr_scheduler" not in payload
    train = ckpt.train_state_of(payload)
    assert (train["epoch"], train["batch_in_epoch"], train["global_step"]) == (1, 3, 15)
    assert train["loss_meter"]["count"] == 3
    restored = TrainState()
    restored.load_state_dict(train)
    assert (restored.epoch, restored.batch_in_epoch, restored.meter.count) == (1, 3, 3)


def test_numbered_names_sort_by_epoch():
    assert numbered_name(7) == "epoch_0007.pt" and numbered_name(12) > numbered_name(9)
