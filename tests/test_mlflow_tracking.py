"""Experiment trackers as the `logger` group, and MLflow tracking of runs, resumes and sweeps.

Runs log to a SQLite store in a temp folder (MLflow 3 refuses its plain-folder store) and
are read back with `MlflowClient`; what MLflow holds must equal what the run wrote itself.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from detr_train.checkpointing.checkpointer import Found
from detr_train.checkpointing.format import KEY_CONFIG_YAML
from detr_train.checkpointing.plan import Plan, checkpoint_config, plan, reconcile_config
from detr_train.config.checks import MLFLOW_MISSING
from detr_train.reporting import mlflow_tracker
from detr_train.reporting.mlflow_tracker import MlflowTracking, record_metrics, tracking_target
from detr_train.reporting.trackers import tracker_callbacks
from detr_train.reporting.visual_callbacks import TensorBoardLogging
from tests.conftest import SHARED_RUN_SETTINGS, SMALL_SYNTHETIC, compose_config, make_trainer, train_in_process

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

# --- the logger group ----------------------------------------------------------------------


@pytest.mark.parametrize("choice,expected", [
    ("none", []),
    ("tensorboard", [TensorBoardLogging]),
    ("mlflow", [MlflowTracking]),
    ("[tensorboard,mlflow]", [TensorBoardLogging, MlflowTracking]),
    ("many", [TensorBoardLogging, MlflowTracking]),
])
def test_each_logger_choice_gives_its_trackers(choice, expected):
    assert [type(c) for c in tracker_callbacks(compose_config([f"logger={choice}"]))] == expected


def _cli_error(monkeypatch, tmp_path, capsys, *overrides: str) -> str:
    assert train_in_process(list(overrides), tmp_path, monkeypatch) == 2
    assert list(tmp_path.iterdir()) == []  # nothing written
    return capsys.readouterr().err.strip()


@pytest.mark.parametrize("old", ["training.tensorboard=true", "+training.tensorboard=false"])
def test_the_old_tensorboard_key_is_one_line_pointing_at_the_logger_group(old, tmp_path, monkeypatch, capsys):
    err = _cli_error(monkeypatch, tmp_path, capsys, old)
    assert err == (f"detr-train: error: training.tensorboard is no longer a key: experiment trackers are the `logger` "
                   f"group; use logger=tensorboard (several: logger=[tensorboard,mlflow]) instead of {old}")


def test_logger_mlflow_without_mlflow_is_one_line_with_the_pip_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    err = _cli_error(monkeypatch, tmp_path, capsys, "logger=mlflow")
    assert err == f"detr-train: error: {MLFLOW_MISSING}"
    assert "pip install 'detr-train[mlflow]'" in MLFLOW_MISSING


def test_a_checkpoint_config_with_training_tensorboard_resumes_with_logger_tensorboard(tmp_path):
    # As an older release stored it: `training.tensorboard`, no `logger` node.
    for stored, expected in ((True, {}), (False, None)):
        saved = OmegaConf.to_container(compose_config([]))
        saved.pop("logger")
        saved["training"]["tensorboard"] = stored
        found = Found(tmp_path / "last.pt", {KEY_CONFIG_YAML: OmegaConf.to_yaml(saved)})
        upgraded = checkpoint_config(found)
        assert "tensorboard" not in upgraded.training
        assert OmegaConf.to_container(upgraded.logger) == {"tensorboard": expected, "mlflow": None}


@pytest.mark.parametrize("before,now", [("none", "many"), ("many", "none"), ("mlflow", "tensorboard")])
def test_a_resume_takes_the_logger_of_its_command_line_whole(before, now, tmp_path):
    stored = compose_config([f"logger={before}"])
    found = Found(tmp_path / "last.pt", {KEY_CONFIG_YAML: OmegaConf.to_yaml(stored)})
    resumed = reconcile_config(found, compose_config([f"logger={now}"]))
    assert (OmegaConf.to_container(resumed.logger, resolve=True)
            == OmegaConf.to_container(compose_config([f"logger={now}"]).logger, resolve=True))


def test_the_default_store_is_sqlite_under_the_outputs_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = tracking_target(None, "outputs")
    assert target.uri == f"sqlite:///{tmp_path}/outputs/mlruns/mlflow.db"
    assert target.artifact_location == f"file://{tmp_path}/outputs/mlruns/artifacts"
    assert tracking_target("http://tracker:5000", "outputs") == mlflow_tracker.TrackingTarget("http://tracker:5000")


def test_a_record_becomes_its_finite_numbers_under_its_own_keys():
    record = {"epoch": 3, "global_step": 12, "lr": 1e-3, "train_loss": 1.5, "map": 0.25, "image_size": 96,
              "map_per_class": {"a+b": 0.5, "unseen": -1.0}, "input_hw": [96, 96], "raw_map": None, "note": "x"}
    assert record_metrics(record) == {"global_step": 12.0, "lr": 1e-3, "train_loss": 1.5, "map": 0.25,
                                      "image_size": 96.0, "map_per_class/a_b": 0.5}


# --- runs ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module's runs (creating one takes seconds); each test its experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _overrides(root: Path, store: str, experiment: str, *extra: str) -> list[str]:
    return SMALL_SYNTHETIC + [f"data.root={root}", *SHARED_RUN_SETTINGS, "logger=mlflow",
                              f"logger.mlflow.tracking_uri={store}", f"logger.mlflow.experiment_name={experiment}",
                              *extra]


def _only_run(store: str, experiment: str):
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def _histories(client: MlflowClient, run) -> dict[str, list[tuple[int, float]]]:
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            for key in run.data.metrics}


def _expected_histories(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl's numbers by key, step = epoch; nested ones as key/name, but for a class's AP
    of -1 (no ground truth: not a score)."""
    expected: dict[str, list[tuple[int, float]]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            pairs = value.items() if isinstance(value, dict) else [(None, value)]
            for name, number in pairs:
                if key == "epoch" or isinstance(number, bool) or not isinstance(number, (int, float)):
                    continue
                if name is not None and number == -1:
                    continue
                expected.setdefault(key if name is None else f"{key}/{name}", []).append((record["epoch"], number))
    return expected


def _flat_config(node, prefix=""):
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flat_config(value, f"{prefix}{key}.").items()}
    text = "null" if node is None else json.dumps(node) if isinstance(node, list) else str(node)
    return {prefix[:-1]: text}


@pytest.mark.slow
def test_params_metrics_and_pictures_equal_what_the_run_wrote(synthetic_root, store, tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose_config(_overrides(synthetic_root, store, "plain", "training.vis_images=1"))
    make_trainer(Plan(cfg, run_dir)).fit()

    client, run = _only_run(store, "plain")
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.tags["run_dir"] == str(run_dir)
    assert run.data.params == _flat_config(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    assert run.data.params["training.lr"] == "0.003" and run.data.params["logger.mlflow.experiment_name"] == "plain"
    expected = _expected_histories(run_dir)
    assert {"map", "train_loss", "lr", "global_step", "raw_map"} <= set(expected)
    assert _histories(client, run) == expected
    artifacts = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, tracking_uri=store,
                                                    dst_path=str(tmp_path / "artifacts"))
    files = sorted(str(p.relative_to(artifacts)) for p in Path(artifacts).rglob("*") if p.is_file())
    assert files == ["plots/confusion_matrix.png", "plots/per_class_ap.png", "plots/pr_curves.png",
                     "predictions/epoch_0001/0.png", "predictions/epoch_0002/0.png", "training_curves.png"]
    assert (Path(artifacts) / "training_curves.png").read_bytes() == (run_dir / "training_curves.png").read_bytes()


@pytest.mark.slow
def test_a_resume_continues_the_same_run_with_each_epoch_once(synthetic_root, store, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    overrides = _overrides(synthetic_root, store, "resumed", "training.ema.enabled=false")
    # Killed right after epoch 2's checkpoint, before MLflow heard of the epoch.
    real = MlflowTracking.on_epoch_end
    monkeypatch.setattr(MlflowTracking, "on_epoch_end",
                        lambda self, trainer, result: None if result.epoch == 2 else real(self, trainer, result))
    make_trainer(Plan(compose_config(overrides + ["training.epochs=2"]), run_dir)).fit()
    monkeypatch.setattr(MlflowTracking, "on_epoch_end", real)
    client, first = _only_run(store, "resumed")
    assert [m.step for m in client.get_metric_history(first.info.run_id, "map")] == [1]

    resumed = plan(compose_config(overrides + ["training.epochs=3", f"training.resume={run_dir}"]), run_dir)
    make_trainer(resumed).fit()

    client, run = _only_run(store, "resumed")
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    histories = _histories(client, run)
    assert [step for step, _ in histories["map"]] == [1, 2, 3]
    assert histories == _expected_histories(run_dir)
    # The resume changed training.epochs; MLflow params keep the run's first value.
    assert run.data.params["training.epochs"] == "2"


@pytest.mark.slow
def test_a_tracker_that_fails_is_a_warning_and_the_run_trains_on(synthetic_root, tmp_path, caplog):
    run_dir = tmp_path / "run"
    cfg = compose_config(_overrides(synthetic_root, "nowhere://tracker", "broken", "training.epochs=1"))
    with caplog.at_level(logging.WARNING, logger="detr_train"):
        trainer = make_trainer(Plan(cfg, run_dir))
        trainer.fit()
    assert trainer.state.epoch == 1 and (run_dir / "checkpoints" / "last.pt").is_file()
    warnings = [r.getMessage() for r in caplog.records if r.name == mlflow_tracker.__name__]
    assert len(warnings) == 1
    assert warnings[0].startswith("MLflow: could not start tracking in nowhere://tracker; this run is not tracked "
                                  "(training goes on): ")


# --- a sweep ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.sweep
def test_a_sweep_is_one_parent_run_with_a_child_per_trial_in_its_trials_csv_state(tmp_path):
    import pandas as pd

    result = subprocess.run(
        [sys.executable, "-m", "detr_train", "search=lr", "budget=tiny", "logger=mlflow",
         f"output_root={tmp_path / 'outputs'}", f"data.root={tmp_path / 'synthetic'}",
         "data.generate.num_train=48", "data.generate.num_val=24", "data.num_workers=0", "model.num_queries=10",
         "training.batch_size=2", "training.schedule.warmup_steps=0", "training.progress=false",
         "training.lr=choice(3e-3, 1e-8, 2e-8)", "training.weight_decay=1e-4", "training.backbone_lr_mult=0.1",
         "budget.max_epochs=2",
         "hydra/sweeper/sampler=grid", "hydra.sweeper.sampler.seed=1", "hydra.sweeper.n_trials=3",
         "hydra/sweeper/pruner=median", "hydra.sweeper.pruner.n_startup_trials=1",
         "hydra.sweeper.pruner.n_warmup_steps=1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sweep_dir = tmp_path / "outputs" / "default" / "search" / "lr_tiny"
    trials = pd.read_csv(sweep_dir / "trials.csv")

    # The default store: SQLite under the outputs root, which `mlflow ui --backend-store-uri` opens.
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("default").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(runs) == 4
    parent = parents[0]
    assert parent.data.tags["sweep_dir"] == str(sweep_dir) and parent.info.status == "FINISHED"
    children = sorted((r for r in runs if r is not parent), key=lambda r: int(r.data.tags["trial_number"]))
    assert all(child.data.tags["mlflow.parentRunId"] == parent.info.run_id for child in children)
    assert [int(c.data.tags["trial_number"]) for c in children] == list(trials["number"])
    assert [c.data.tags["trial_state"] for c in children] == list(trials["state"])
    assert set(trials["state"]) == {"COMPLETE", "PRUNED"}
    for child, row in zip(children, trials.itertuples()):
        assert child.data.tags["run_dir"] == row.run_dir
        assert _histories(client, child) == _expected_histories(Path(row.run_dir))
    assert parent.data.metrics["best_value"] == trials["value"].max()
