"""Shared fixtures: a small synthetic dataset made once per session, and config composition."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Without a GPU the Triton kernels run in Triton's interpreter. Triton reads the switch when
# it is first imported (transformers imports it), so it is set before anything else loads.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

from hydra import compose, initialize_config_dir  # noqa: E402

from detr_train.config import config_dir  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent

# Small enough to generate in a second, big enough to train on.
SMALL_SYNTHETIC = [
    "data.generate.num_train=48",
    "data.generate.num_val=16",
    "data.generate.image_size=96",
    "data.generate.min_object_size=16",
    "data.generate.max_object_size=40",
    "data.image_size=96",
    "data.eval_size=96",
    "data.num_workers=0",
]


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_trainer(the_plan):
    """The Trainer `detr-train` builds for a plan: with the callbacks its config asks for.
    A new run in a folder is `make_trainer(Plan(cfg, run_dir))`."""
    from detr_train.cli.callbacks import build_callbacks
    from detr_train.training.trainer import trainer_for

    return trainer_for(the_plan, callbacks=build_callbacks(the_plan.cfg))


def compose_config(overrides: list[str] | None = None):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose("config", overrides=list(overrides or []))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small generated dataset shared by the whole session (read-only for tests)."""
    from detr_train.data.synthetic import ensure_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic") / "data"
    cfg = compose_config(SMALL_SYNTHETIC + [f"data.root={root}"])
    ensure_synthetic_dataset(cfg.data)
    return root


@pytest.fixture
def small_run_overrides(synthetic_root, tmp_path) -> list[str]:
    """Overrides for a fast end-to-end run on the shared small dataset."""
    return SMALL_SYNTHETIC + [
        f"data.root={synthetic_root}",
        f"output_root={tmp_path / 'outputs'}",
        "training.batch_size=4",
        "training.log_every=0",
        "training.progress=false",
        "training.schedule.warmup_steps=2",
    ]


# The shared trained run: two short epochs at a raised LR, enough for COCOeval to find some
# true positives (AP > 0). EMA weights are scored, then the raw ones too (raw_map).
SHARED_RUN_SETTINGS = [
    "training.batch_size=4", "training.log_every=0", "training.progress=false", "training.schedule.warmup_steps=2",
    "training.subset_size=16", "training.val_subset_size=16", "training.epochs=2", "training.lr=3e-3",
    "training.ema.enabled=true", "training.ema.eval_raw=true", "training.ema.decay=0.5", "training.ema.warmup_steps=1",
]
SHARED_RUN_VIS_IMAGES = 2


def spy_on(monkeypatch, module, name: str) -> list[dict]:
    """Record every call of module.<name>, then call the real function."""
    real, calls = getattr(module, name), []

    def spy(*args, **kwargs):
        calls.append({"args": args, "kwargs": kwargs})
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.fixture(scope="session")
def trained_run(synthetic_root, tmp_path_factory):
    """One run of the tiny model shared by the evaluation, prediction and picture tests, with
    everything a run can leave switched on: plots, prediction images, TensorBoard (where
    installed) and the HF export. The plotting calls are recorded, to compare with what the
    run scored."""
    from types import SimpleNamespace

    from detr_train.checkpointing.plan import Plan
    from detr_train.reporting import plots

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    with_tensorboard = importlib.util.find_spec("tensorboard") is not None
    overrides = SMALL_SYNTHETIC + [f"data.root={synthetic_root}", *SHARED_RUN_SETTINGS,
                                   f"training.vis_images={SHARED_RUN_VIS_IMAGES}",
                                   # Every predicted box drawn: a barely trained model scores low.
                                   "training.vis_score_threshold=0.0", "training.export_hf=true",
                                   *(["logger=tensorboard"] if with_tensorboard else [])]
    with pytest.MonkeyPatch.context() as monkeypatch:
        per_class_calls = spy_on(monkeypatch, plots, "plot_per_class_ap")
        pr_calls = spy_on(monkeypatch, plots, "plot_precision_recall")
        confusion_calls = spy_on(monkeypatch, plots, "plot_confusion_matrix")
        trainer = make_trainer(Plan(compose_config(overrides), run_dir))
        trainer.fit()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return SimpleNamespace(run_dir=run_dir, trainer=trainer, overrides=overrides, per_class_calls=per_class_calls,
                           pr_calls=pr_calls, confusion_calls=confusion_calls, records=records,
                           tensorboard=with_tensorboard)


def train_in_process(overrides: list[str], tmp_path: Path, monkeypatch) -> int:
    """`detr-train <overrides> output_root=<tmp_path>/outputs`, run in this process from
    `tmp_path` without HYDRA_FULL_ERROR: its exit status (what stderr says is in capsys)."""
    from detr_train.cli import train as cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", ["detr-train", *overrides, f"output_root={tmp_path / 'outputs'}"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code


def run_cli(args: list[str], *, cwd: Path | None = None, timeout: float = 600, env: dict | None = None):
    """Run `python -m detr_train` in a subprocess; returns the CompletedProcess."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "detr_train", *args],
        cwd=cwd or REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=full_env,
    )
