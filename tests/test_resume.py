"""Resume: a stopped run continues exactly as if it had never stopped."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from detr_train.checkpointing import format as ckpt
from detr_train.checkpointing.plan import Plan, plan
from detr_train.training.trainer import Trainer
from tests.conftest import SMALL_SYNTHETIC, compose_config, make_trainer, run_cli

pytestmark = pytest.mark.slow

# LR schedules that depend only on the step (not on the total length) make
# "2 epochs, then 2 more" the same run as "4 epochs".
EXACT = ["training.schedule.name=step", "training.schedule.step_epochs=[3]", "training.epochs=4",
         "training.val_subset_size=8"]
TIMING_KEYS = {"epoch_time", "eval_time", "data_wait_fraction"}


def _cfg(small_run_overrides, *extra):
    return compose_config(small_run_overrides + EXACT + list(extra))


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


def _text(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def _train_state(path: Path) -> dict:
    return ckpt.train_state_of(ckpt.load_checkpoint(path))


def _resume(cfg, run_dir: Path) -> Trainer:
    cfg.training.resume = str(run_dir)
    resumed = plan(cfg, run_dir)
    trainer = make_trainer(resumed)
    trainer.fit()
    return trainer


@pytest.fixture(scope="module")
def straight_run(synthetic_root, tmp_path_factory):
    # One uninterrupted reference run shared by the equivalence tests.
    overrides = SMALL_SYNTHETIC + [f"data.root={synthetic_root}", "training.batch_size=4", "training.log_every=0",
                                   "training.progress=false", "training.schedule.warmup_steps=2"]
    trainer = make_trainer(Plan(compose_config(overrides + EXACT), tmp_path_factory.mktemp("straight")))
    trainer.fit()
    return trainer


def _assert_same_run(straight: Trainer, resumed: Trainer):
    assert _records(resumed.run_dir) == _records(straight.run_dir)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.state == straight.state


def test_two_epochs_then_resume_equals_four_straight(straight_run, small_run_overrides, tmp_path):
    run_dir = tmp_path / "split"
    make_trainer(Plan(_cfg(small_run_overrides, "training.epochs=2"), run_dir)).fit()
    assert [r["epoch"] for r in _records(run_dir)] == [1, 2]
    resumed = _resume(_cfg(small_run_overrides), run_dir)
    assert [r["epoch"] for r in _records(run_dir)] == [1, 2, 3, 4]
    _assert_same_run(straight_run, resumed)


class _Crash(RuntimeError):
    pass


def test_mid_epoch_checkpoint_resumes_at_the_exact_batch(straight_run, small_run_overrides, tmp_path, monkeypatch):
    run_dir = tmp_path / "crashed"
    trainer = make_trainer(Plan(_cfg(small_run_overrides, "training.checkpoint.every_n_steps=5"), run_dir))
    original_save = trainer.checkpointer.save

    def save_then_crash(**kwargs):
        path = original_save(**kwargs)
        if trainer.state.global_step == 15:  # 12 batches per epoch: epoch 2, batch 3
            raise _Crash
        return path

    monkeypatch.setattr(trainer.checkpointer, "save", save_then_crash)
    with pytest.raises(_Crash):
        trainer.fit()
    saved = _train_state(run_dir / "checkpoints" / "last.pt")
    assert (saved["epoch"], saved["batch_in_epoch"]) == (1, 3)
    _assert_same_run(straight_run, _resume(_cfg(small_run_overrides), run_dir))


def test_sigterm_stops_cleanly_and_resumes_exactly(straight_run, small_run_overrides, tmp_path):
    run_dir = tmp_path / "preempted"
    trainer = make_trainer(Plan(_cfg(small_run_overrides), run_dir))
    calls = {"n": 0}

    def preempt(module, args):
        calls["n"] += 1
        if calls["n"] == 20:  # 12 train + 2 eval forwards in epoch 1: train batch 6 of epoch 2
            os.kill(os.getpid(), signal.SIGTERM)

    handle = trainer.model.register_forward_pre_hook(preempt)
    trainer.fit()  # returns normally: the signal only asks for a clean stop
    handle.remove()
    saved = _train_state(run_dir / "checkpoints" / "last.pt")
    assert saved["global_step"] == 18 and saved["batch_in_epoch"] == 6
    assert [r["epoch"] for r in _records(run_dir)] == [1]
    _assert_same_run(straight_run, _resume(_cfg(small_run_overrides), run_dir))


def test_cli_resume_with_more_epochs_continues_in_the_same_run_dir(small_run_overrides, tmp_path):
    args = small_run_overrides + ["training.epochs=2", "training.val_subset_size=4", "name=grow"]
    first = run_cli(args)
    assert first.returncode == 0, first.stderr[-2000:]
    (run_dir,) = (tmp_path / "outputs" / "grow").iterdir()
    second = run_cli(args + ["training.epochs=3", f"training.resume={run_dir}", "training.lr=0.5"])
    assert second.returncode == 0, second.stderr[-2000:]
    assert [p.name for p in (tmp_path / "outputs" / "grow").iterdir()] == [run_dir.name]
    assert [r["epoch"] for r in _records(run_dir)] == [1, 2, 3]
    log = (run_dir / "train.log").read_text()
    assert "epoch 2/2" in log and "epoch 3/3" in log
    assert "training.epochs changed 2 -> 3 (the new value wins)" in log
    assert "training.lr: checkpoint 0.001, now 0.5" in log
    # `auto` finds the newest resumable run of the same name; nothing left to do there.
    third = run_cli(args + ["training.epochs=3", "training.resume=auto"])
    assert third.returncode == 0
    assert [r["epoch"] for r in _records(run_dir)] == [1, 2, 3]


def test_resume_from_damaged_last_uses_newest_intact_and_reports(small_run_overrides, tmp_path, caplog):
    run_dir = tmp_path / "damaged"
    make_trainer(Plan(_cfg(small_run_overrides, "training.epochs=2", "training.checkpoint.keep_last=2"), run_dir)).fit()
    last = run_dir / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    cfg = _cfg(small_run_overrides, f"training.resume={run_dir}")
    target = plan(cfg, tmp_path / "fresh").resume_from
    assert target.path.name == "epoch_0002.pt"
    assert any("last.pt is truncated or corrupted" in reason for reason in target.skipped)
    with pytest.raises(ckpt.CheckpointError, match="last.pt is truncated"):
        plan(_cfg(small_run_overrides, f"training.resume={last}"), tmp_path / "fresh")


def test_incompatible_checkpoint_is_refused_and_the_run_dir_untouched(small_run_overrides, tmp_path):
    args = small_run_overrides + ["training.epochs=1", "training.val_subset_size=4", "name=clash"]
    assert run_cli(args).returncode == 0
    (run_dir,) = (tmp_path / "outputs" / "clash").iterdir()
    last = run_dir / "checkpoints" / "last.pt"
    payload = torch.load(last, weights_only=True)
    cfg = OmegaConf.create(payload[ckpt.KEY_CONFIG_YAML])
    cfg.model.d_model = 32  # the weights no longer fit the architecture the checkpoint describes
    payload[ckpt.KEY_CONFIG_YAML] = OmegaConf.to_yaml(cfg)
    architecture = json.loads(payload[ckpt.KEY_MODEL_CONFIG])  # what a resume rebuilds the model from
    architecture["d_model"] = 32
    payload[ckpt.KEY_MODEL_CONFIG] = json.dumps(architecture)
    ckpt.save_checkpoint(last, payload)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    result = run_cli(args + [f"training.resume={last}"])
    assert result.returncode != 0
    assert "does not fit this model" in result.stdout + result.stderr
    assert "model.model.input_proj" in result.stdout + result.stderr or "shape mismatch" in result.stdout + result.stderr
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != "train.log"}
    assert after == {p: b for p, b in before.items() if p.name != "train.log"}


def test_missing_resume_path_is_one_clear_error(tmp_path):
    result = run_cli([f"training.resume={tmp_path / 'nope.pt'}", f"output_root={tmp_path}"], timeout=120)
    assert result.returncode != 0
    assert f"checkpoint not found: {tmp_path / 'nope.pt'}" in result.stdout + result.stderr


def test_sigterm_to_the_cli_process_checkpoints_and_auto_resume_finishes(small_run_overrides, tmp_path):
    import subprocess
    import sys
    import time

    from tests.conftest import REPO_ROOT

    args = small_run_overrides + ["training.epochs=6", "training.val_subset_size=4", "name=preempt",
                                  "data.num_workers=1"]
    process = subprocess.Popen([sys.executable, "-m", "detr_train", *args], cwd=REPO_ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    runs = tmp_path / "outputs" / "preempt"
    deadline = time.time() + 300
    while time.time() < deadline and not list(runs.glob("*/metrics.jsonl")):
        time.sleep(0.2)
    # To the whole process group, DataLoader worker included, as SLURM and `timeout` send it.
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-2000:]
    assert "training.resume=" in output
    (run_dir,) = runs.iterdir()
    saved = _train_state(run_dir / "checkpoints" / "last.pt")
    assert 1 <= saved["epoch"] < 6
    finished = run_cli(args + ["training.resume=auto"])
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert [p.name for p in runs.iterdir()] == [run_dir.name]
    assert [r["epoch"] for r in _records(run_dir)] == [1, 2, 3, 4, 5, 6]


def test_a_requeued_job_started_again_without_a_resume_path_continues_mid_epoch(small_run_overrides, tmp_path):
    """SLURM requeues a pre-empted job with the same command and job id: no path to type."""
    import subprocess
    import sys
    import time

    from tests.conftest import REPO_ROOT

    args = small_run_overrides + ["training.epochs=3", "training.val_subset_size=4", "name=requeue",
                                  "training.log_every=1"]
    env = dict(os.environ, SLURM_JOB_ID="4242")
    process = subprocess.Popen([sys.executable, "-m", "detr_train", *args], cwd=REPO_ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "outputs" / "requeue" / "slurm_4242"
    # Signal on observed progress, not on time: the first step of epoch 2 is in the log (epoch 1
    # is checkpointed), and 11 of its 12 steps are still to come.
    deadline = time.time() + 300
    while time.time() < deadline and "epoch 2 step 13:" not in _text(run_dir / "train.log"):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-2000:]
    stopped = _train_state(run_dir / "checkpoints" / "last.pt")
    # Stopped inside epoch 2, not at an epoch boundary.
    assert stopped["epoch"] == 1 and stopped["batch_in_epoch"] > 0

    again = run_cli(args, env={"SLURM_JOB_ID": "4242"})
    assert again.returncode == 0, again.stderr[-2000:]
    log_text = (run_dir / "train.log").read_text()
    assert "already holds a run; continuing it from last.pt" in log_text
    assert f"continuing at epoch 2, batch {stopped['batch_in_epoch']}" in log_text
    assert [p.name for p in run_dir.parent.iterdir()] == ["slurm_4242"]
    assert [r["epoch"] for r in _records(run_dir)] == [1, 2, 3]
    final = _train_state(run_dir / "checkpoints" / "last.pt")
    assert final["global_step"] == 3 * 12  # 48 images / batch 4, every step taken exactly once


def test_a_stop_signal_is_passed_on_to_the_previous_handler_after_the_checkpoint():
    """Under submitit the previous SIGUSR2 handler is the one that requeues the job."""
    from detr_train.training.signals import GracefulStop

    received = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: received.append(signum))
    try:
        with GracefulStop() as stop:
            os.kill(os.getpid(), signal.SIGUSR2)
            assert stop.requested == "SIGUSR2" and received == []  # only noted while training
            stop.hand_over()
            assert received == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


LEGACY_RUN = Path(__file__).parent / "data" / "legacy_format1_run"
# The settings tests/data/legacy_format1_run was trained with (checkpoint format 1, the first
# release): a tiny model stopped at epoch 2, batch 3 by a mid-epoch checkpoint.
LEGACY = ["training.schedule.name=step", "training.schedule.step_epochs=[2]", "training.epochs=2",
          "training.val_subset_size=8", "training.checkpoint.every_n_steps=5", "model.d_model=32",
          "model.encoder_ffn_dim=64", "model.decoder_ffn_dim=64", "model.num_queries=5",
          "model.encoder_attention_heads=2", "model.decoder_attention_heads=2", "model.backbone.embedding_size=8",
          "model.backbone.hidden_sizes=[8,16,32]",
          # The first release's defaults that have changed since: its backbone, gradient clip and
          # decoder (no box refinement, no two-stage proposals).
          "model.backbone.type=resnet", "model.backbone.layer_type=basic", "model.backbone.norm=group_norm",
          "training.grad_clip=0.1", "model.with_box_refine=false", "model.two_stage=false"]


def _assert_close_records(got: list[dict], expected: list[dict]) -> None:
    assert [sorted(r) for r in got] == [sorted(r) for r in expected]
    for record, reference in zip(got, expected):
        for key, value in reference.items():
            if isinstance(value, dict):
                assert record[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
            elif isinstance(value, float):
                assert record[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
            else:
                assert record[key] == value, key


def test_a_run_checkpointed_by_the_first_release_resumes_as_if_never_stopped(small_run_overrides, tmp_path):
    import shutil

    run_dir = tmp_path / "legacy"
    shutil.copytree(LEGACY_RUN, run_dir)
    straight = make_trainer(Plan(compose_config(small_run_overrides + LEGACY), tmp_path / "straight"))
    straight.fit()
    # The dataset has moved since (data.root may change on resume); everything else comes from the checkpoint.
    resumed = _resume(compose_config(small_run_overrides + LEGACY), run_dir)
    assert [r["epoch"] for r in _records(run_dir)] == [1, 2]
    # The first release computed the loss with transformers' criterion, which sums in another
    # order than ours (equal to ~1e-7): the same run up to float rounding, not bit for bit.
    _assert_close_records(_records(resumed.run_dir), _records(straight.run_dir))
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        # Weights whose gradient is ~0 (biases before a GroupNorm) random-walk by up to the LR
        # (1e-3) per Adam step on rounding noise alone; the loss records above are the tight check.
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-3), name
    for key in ("epoch", "batch_in_epoch", "global_step", "best_epoch"):
        assert getattr(resumed.state, key) == getattr(straight.state, key)


def test_a_run_that_accumulates_gradients_resumes_mid_epoch_exactly(small_run_overrides, tmp_path, monkeypatch):
    """Checkpoints of an accumulating run fall on optimiser-step boundaries (after a whole
    window of micro-batches), so a resume from one continues exactly."""
    overrides = ["training.accumulate_steps=2", "training.checkpoint.every_n_steps=2", "training.subset_size=32"]
    straight = make_trainer(Plan(_cfg(small_run_overrides, *overrides), tmp_path / "straight"))
    straight.fit()
    run_dir = tmp_path / "crashed"
    trainer = make_trainer(Plan(_cfg(small_run_overrides, *overrides), run_dir))
    original_save = trainer.checkpointer.save

    def save_then_crash(**kwargs):
        path = original_save(**kwargs)
        if trainer.state.global_step == 6:  # 8 batches = 4 steps per epoch: epoch 2, step 2
            raise _Crash
        return path

    monkeypatch.setattr(trainer.checkpointer, "save", save_then_crash)
    with pytest.raises(_Crash):
        trainer.fit()
    saved = _train_state(run_dir / "checkpoints" / "last.pt")
    assert (saved["epoch"], saved["batch_in_epoch"], saved["global_step"]) == (1, 4, 6)
    assert saved["effective_batch_size"] == 8
    _assert_same_run(straight, _resume(_cfg(small_run_overrides, *overrides), run_dir))
