"""Level 2: the CLI's default run, shortened, completes and writes the run-dir contract."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from tests.conftest import REPO_ROOT, run_cli

pytestmark = pytest.mark.slow

EPOCH_KEYS = {"epoch", "lr", "train_loss", "train_loss_ce", "train_loss_bbox", "train_loss_giou", "map", "map_50",
              "map_75", "map_small", "map_medium", "map_large", "map_per_class", "epoch_time", "image_size"}


def test_default_run_writes_the_run_directory(small_run_overrides, synthetic_root, tmp_path):
    result = run_cli(small_run_overrides + ["training.epochs=2", "training.export_hf=true"])
    assert result.returncode == 0, result.stderr[-3000:]
    run_dirs = [p for p in (tmp_path / "outputs" / "default").iterdir() if p.is_dir()]
    assert len(run_dirs) == 1
    run_dir = run_dirs[0]
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert config["model"]["name"] == "deformable_detr_tiny" and config["training"]["epochs"] == 2
    log_text = (run_dir / "train.log").read_text()
    assert "epoch 2/2" in log_text and "Best validation mAP" in log_text
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(EPOCH_KEYS <= set(r) for r in records)
    assert all(0.0 <= r["map"] <= 1.0 for r in records)
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert last["train"]["epoch"] == 2
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert best["train"]["best_metric"] == max(r["map"] for r in records)
    assert (run_dir / "hf_model" / "config.json").is_file()
    assert (run_dir / "hf_model" / "preprocessor_config.json").is_file()

    # The run's last lines say where it is and what to run next, with its real paths.
    best_epoch = max(records, key=lambda r: r["map"])["epoch"]
    last_lines = log_text[log_text.rindex("epoch 2/2"):]
    for expected in (f"Run directory: {run_dir}",
                     f"Best validation mAP {best['train']['best_metric']:.4f} at epoch {best_epoch}",
                     f"Curves and plots: {run_dir / 'training_curves.png'}, {run_dir / 'plots' / 'per_class_ap.png'}",
                     f"Score it again:       detr-train-eval {run_dir}",
                     f"Draw its detections:  detr-train-predict {run_dir} {synthetic_root / 'val'}",
                     f"Deploy it as ONNX:    detr-train-export {run_dir} --output {run_dir / 'model.onnx'}"):
        assert expected in last_lines, (expected, last_lines)
    assert "training.resume=" not in last_lines  # it finished: nothing to continue


def test_amp_without_cuda_warns_once_and_trains_in_fp32(small_run_overrides):
    result = run_cli(small_run_overrides + ["training.epochs=1", "training.amp=true", "training.val_subset_size=4"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (result.stdout + result.stderr).count("training.amp=true needs CUDA") == 1


def test_help_lists_the_groups_without_importing_torch():
    # --help must answer at once: neither torch nor transformers (nor mlflow) may load on its path.
    code = ("import sys; sys.argv = ['detr-train', '--help']\n"
            "from detr_train.cli import train\n"
            "try:\n    train.main()\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'\n"
            "assert 'mlflow' not in sys.modules, 'mlflow imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "model: deformable_detr, deformable_detr_tiny" in result.stdout


def test_bad_dataset_path_is_one_clear_error(tmp_path):
    result = run_cli(["data=coco", f"data.root={tmp_path / 'nowhere'}", f"output_root={tmp_path}", "data.num_workers=0"])
    assert result.returncode != 0
    assert f"annotation file not found: {tmp_path / 'nowhere'}" in result.stdout + result.stderr
