"""Checkpoint files: complete round trip, weights_only safety, atomic writes, clear errors."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from detr_train import checkpoint as ckpt


def _payload(model, optimizer, scheduler, scaler, **overrides):
    payload = {
        ckpt.KEY_FORMAT_VERSION: ckpt.FORMAT_VERSION,
        ckpt.KEY_MODEL: model.state_dict(),
        ckpt.KEY_OPTIMIZER: optimizer.state_dict(),
        ckpt.KEY_LR_SCHEDULER: scheduler.state_dict(),
        ckpt.KEY_GRAD_SCALER: scaler.state_dict(),
        ckpt.KEY_EPOCH: 3,
        ckpt.KEY_BATCH_IN_EPOCH: 5,
        ckpt.KEY_GLOBAL_STEP: 41,
        ckpt.KEY_BEST_METRIC: 0.37,
        ckpt.KEY_BEST_EPOCH: 2,
        ckpt.KEY_RNG: ckpt.capture_rng_state(),
        ckpt.KEY_CONFIG_YAML: "training:\n  epochs: 4\n",
    }
    payload.update(overrides)
    return payload


def _stateful_parts():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler, scaler


def test_every_state_survives_a_round_trip(tmp_path):
    model, optimizer, scheduler, scaler = _stateful_parts()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = ckpt.save_checkpoint(tmp_path / "last.pt", _payload(model, optimizer, scheduler, scaler))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    loaded = ckpt.load_checkpoint(path)
    # Plain torch.load with weights_only=True must accept the file as is.
    torch.load(path, weights_only=True)

    fresh_model, fresh_opt, fresh_sched, fresh_scaler = (torch.nn.Linear(3, 2), None, None, None)
    fresh_opt = torch.optim.AdamW(fresh_model.parameters(), lr=1e-3)
    fresh_sched = torch.optim.lr_scheduler.StepLR(fresh_opt, step_size=2)
    fresh_scaler = torch.amp.GradScaler("cpu", enabled=True)
    ckpt.load_model_state(fresh_model, loaded[ckpt.KEY_MODEL], path)
    fresh_opt.load_state_dict(loaded[ckpt.KEY_OPTIMIZER])
    fresh_sched.load_state_dict(loaded[ckpt.KEY_LR_SCHEDULER])
    fresh_scaler.load_state_dict(loaded[ckpt.KEY_GRAD_SCALER])
    for a, b in zip(model.state_dict().values(), fresh_model.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert fresh_sched.state_dict() == scheduler.state_dict()
    assert fresh_scaler.get_scale() == 1024.0
    assert (loaded[ckpt.KEY_EPOCH], loaded[ckpt.KEY_BATCH_IN_EPOCH], loaded[ckpt.KEY_GLOBAL_STEP]) == (3, 5, 41)
    assert (loaded[ckpt.KEY_BEST_METRIC], loaded[ckpt.KEY_BEST_EPOCH]) == (0.37, 2)
    assert loaded[ckpt.KEY_CONFIG_YAML].startswith("training:")
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    ckpt.restore_rng_state(loaded[ckpt.KEY_RNG])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned_marker",))


def test_a_checkpoint_carrying_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "model": _Exploit()}, path)
    with pytest.raises(ckpt.CheckpointError, match="refused.*posix.system") as info:
        ckpt.load_checkpoint(path)
    assert str(path) in str(info.value)
    assert not (tmp_path / "pwned_marker").exists()


def test_an_interrupted_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    model, optimizer, scheduler, scaler = _stateful_parts()
    path = ckpt.save_checkpoint(tmp_path / "last.pt", _payload(model, optimizer, scheduler, scaler, epoch=1))

    def failing_save(obj, handle):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(path, _payload(model, optimizer, scheduler, scaler, epoch=2))
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)[ckpt.KEY_EPOCH] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


@pytest.mark.parametrize("damage,match", [
    ("missing", "checkpoint not found"),
    ("empty", "is empty"),
    ("truncated", "truncated or corrupted"),
    ("garbage", "truncated or corrupted"),
    ("not_ours", "not a complete detr_train checkpoint"),
])
def test_damaged_checkpoints_give_one_line_naming_the_file(tmp_path, damage, match):
    model, optimizer, scheduler, scaler = _stateful_parts()
    path = tmp_path / "last.pt"
    good = ckpt.save_checkpoint(tmp_path / "good.pt", _payload(model, optimizer, scheduler, scaler)).read_bytes()
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


def test_model_mismatch_names_the_keys(tmp_path):
    state = torch.nn.Linear(3, 2).state_dict()
    with pytest.raises(ckpt.CheckpointError, match=r"shape mismatch: .*weight \(2, 3\) vs \(5, 3\)") as info:
        ckpt.load_model_state(torch.nn.Linear(3, 5), state, Path("x.pt"))
    assert "bias" in str(info.value)


def test_keep_last_prunes_numbered_copies(tmp_path):
    for epoch in range(1, 6):
        (tmp_path / ckpt.numbered_name(epoch)).write_bytes(b"x")
    ckpt.prune_numbered(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_0004.pt", "epoch_0005.pt"]
