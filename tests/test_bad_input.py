"""The bad-input catalogue: every mistake a user can make gets one line, exit status 2, the
culprit named, and (for config mistakes) no run directory at all."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from detr_train.cli import train as cli
from tests.conftest import REPO_ROOT, run_cli, train_in_process

# (overrides, what the one line must name). Each is refused while the config is composed
# and checked, before Hydra makes a run directory.
CONFIG_MISTAKES = [
    (["training.lr=-1e-3"], "training.lr must be > 0, got -0.001"),
    (["training.epochs=0"], "training.epochs must be >= 1, got 0"),
    (["training.batch_size=2.5"], "training.batch_size=2.5"),
    (["training.batch_size=0"], "training.batch_size must be >= 1"),
    (["training.val_subset_size=0"], "training.val_subset_size must be >= 1 or null, got 0"),
    (["training.schedule.name=linear"], "training.schedule.name=linear"),
    (["training.epochs=abc"], "training.epochs=abc"),
    (["training.no_such_key=1"], "Could not override 'training.no_such_key'"),
    (["training.amp_dtype=float8"], "training.amp_dtype=float8"),
    (["training.nonfinite=ignore"], "training.nonfinite=ignore"),
    (["training.device=tpu"], "training.device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["training.device=cuda"], "training.device='cuda' but CUDA is not available"),
    (["training.progress=maybe"], "training.progress must be auto, true or false, got 'maybe'"),
    (["training.resize_schedule=[[2,640]]"], "training.resize_schedule must start at epoch 1"),
    (["training.resize_schedule=[[1,0]]"], "training.resize_schedule[0]: size must be positive"),
    (["training.resize_schedule=[[1,640],[1,800]]"], "training.resize_schedule[1]: first epochs must be strictly"),
    (["training.resize_schedule=640"], "training.resize_schedule=640"),
    (["training.subset_size=0"], "training.subset_size must be >= 1 or null, got 0"),
    (["training.overfit_size=0"], "training.overfit_size must be >= 1, got 0"),
    (["training.grad_clip=-1"], "training.grad_clip must be >= 0"),
    (["training.weight_decay=-0.1"], "training.weight_decay must be >= 0"),
    (["training.eval_every=0"], "training.eval_every must be >= 1"),
    (["training.log_every=-1"], "training.log_every must be >= 0"),
    (["training.checkpoint.keep_last=-1"], "training.checkpoint.keep_last must be >= 0"),
    (["training.checkpoint.every_n_steps=-5"], "training.checkpoint.every_n_steps must be >= 0"),
    (["training.schedule.warmup_steps=-1"], "training.schedule.warmup_steps must be >= 0"),
    (["training.schedule.min_lr_ratio=2"], "training.schedule.min_lr_ratio must be in [0, 1]"),
    (["training.schedule.gamma=0"], "training.schedule.gamma must be in (0, 1]"),
    (["training.max_nonfinite_steps=-1"], "training.max_nonfinite_steps must be >= 0"),
    (["training.accumulate_steps=0"], "training.accumulate_steps must be >= 1, got 0"),
    (["training.ema.decay=1.5"], "training.ema.decay must be in (0, 1), got 1.5"),
    (["training.ema.decay=0"], "training.ema.decay must be in (0, 1), got 0.0"),
    (["training.early_stop.patience=-1"], "training.early_stop.patience must be >= 0"),
    (["model.decoder_layers=1"], "model.decoder_layers must be >= 2, got 1"),
    (["model.d_model=130"], "model.d_model=130 must be divisible by model.encoder_attention_heads=4"),
    (["model.num_feature_levels=1"], "model.num_feature_levels=1 is smaller than the number of"),
    (["model.num_queries=0"], "model.num_queries must be >= 1, got 0"),
    (["model.dropout=1.5"], "model.dropout must be in [0, 1)"),
    (["model.backbone.norm=batch"], "model.backbone.norm=batch"),
    (["model.attention_kernel=cuda"], "model.attention_kernel=cuda Invalid value 'cuda', expected one of [auto, triton, pytorch]"),
    (["model.loss.class_cost=2.5"], "model.loss.class_cost must be a whole number"),
    (["data.image_size=0"], "data.image_size must be >= 1, got 0"),
    (["data.max_size_ratio=0.5"], "data.max_size_ratio must be >= 1"),
    (["data.num_workers=-1"], "data.num_workers must be >= 0, got -1"),
    (["data.augment.hflip_prob=1.5"], "data.augment.hflip_prob"),
    (["data/augment=detr", "data.augment.scales=[0,800]"], "data.augment.scales"),
    (["data/augment=detr", "data.augment.crop.min_side=700"], "data.augment.crop"),
    (["data.augment=detr"], "data.augment=detr"),  # a group chosen with a dot: the hint says slash
    (["data=coco"], "data.root is required here"),
    (["data=nope"], "Could not find 'data/nope'"),
    (["data=coco", "data.root=/x", "data.generate.num_train=5"], "data.generate.num_train=5"),
    (["budget.max_epochs=0"], "budget.max_epochs must be >= 1 or null, got 0"),
    (["model.backbone.type=resnet", "model.backbone.norm=group_norm"],
     "model.backbone.norm=group_norm is kept only to resume runs trained with it"),
]


def _id(case) -> str:
    return " ".join(case[0])


@pytest.mark.parametrize("overrides,named", CONFIG_MISTAKES, ids=[_id(c) for c in CONFIG_MISTAKES])
def test_a_config_mistake_is_one_line_exit_2_and_writes_nothing(overrides, named, tmp_path, monkeypatch, capsys):
    assert train_in_process(overrides, tmp_path, monkeypatch) == 2
    err = capsys.readouterr().err
    first, *rest = err.strip().splitlines()
    assert first.startswith("detr-train: error: ") and named in first
    assert all(line.startswith("  hint: ") for line in rest)
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no run dir, no outputs folder, no log


@pytest.mark.slow
def test_a_search_with_a_fixed_bad_value_is_refused_before_any_trial(tmp_path):
    result = run_cli(["search=demo", "training.lr=-1", f"output_root={tmp_path}"], timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "detr-train: error: training.lr must be > 0, got -1.0"
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


def _write_garbage(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"not a checkpoint at all" * 50)
    return path


def _write_bad_json(tmp_path):
    (tmp_path / "ds" / "annotations").mkdir(parents=True)
    (tmp_path / "ds" / "annotations" / "train.json").write_text("{not json")
    return tmp_path / "ds"


# Mistakes only the run can see (files, data, the machine): one line, exit 2, no traceback,
# and whatever was already written stays as it was.
COCO = ["data=coco", "data.num_workers=0"]
RUN_MISTAKES = [
    (lambda tmp: COCO + [f"data.root={tmp / 'nowhere'}"],
     lambda tmp: f"annotation file not found: {tmp / 'nowhere' / 'annotations' / 'instances_train2017.json'}"),
    (lambda tmp: COCO + [f"data.root={_write_bad_json(tmp)}", "data.train_ann=annotations/train.json"],
     lambda tmp: f"annotation file {tmp / 'ds' / 'annotations' / 'train.json'} is not valid json"),
    (lambda tmp: [f"training.resume={tmp / 'nope.pt'}"],
     lambda tmp: f"checkpoint not found: {tmp / 'nope.pt'}"),
    (lambda tmp: [f"training.resume={_write_garbage(tmp)}"],
     lambda tmp: f"checkpoint {tmp / 'garbage.pt'} is truncated or corrupted"),
    (lambda tmp: [f"model.pretrained={tmp / 'no_such_model'}"],
     lambda tmp: "model.pretrained="),
    (lambda tmp: ["training.subset_size=100000"],
     lambda tmp: "training.subset_size=100000 is larger than the training set"),
    (lambda tmp: ["model.attention_kernel=triton"],
     lambda tmp: "model.attention_kernel=triton cannot run on cpu"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(RUN_MISTAKES)))
def test_a_mistake_found_by_the_run_is_one_line_exit_2(case, small_run_overrides, tmp_path):
    overrides, named = RUN_MISTAKES[case]
    arguments = overrides(tmp_path)
    if "data=coco" in arguments:  # the synthetic data's settings do not apply
        arguments += [f"output_root={tmp_path / 'outputs'}"]
    else:
        arguments = small_run_overrides + arguments
    # The interpreter would let Triton run on the CPU; a user's machine has none.
    result = run_cli(arguments, timeout=300, env={"TRITON_INTERPRET": "0"})
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("detr-train: error: ")]
    assert len(errors) == 1 and named(tmp_path) in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.slow
def test_verbose_shows_the_traceback(tmp_path):
    result = run_cli(["training.lr=-1", f"output_root={tmp_path}", "--verbose"], timeout=120)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "ConfigError: training.lr must be > 0" in result.stderr


def test_an_unexpected_error_keeps_its_traceback(monkeypatch, tmp_path):
    """A bug is not a user error: it is raised as it is, for Hydra to print with its traceback."""
    from omegaconf import OmegaConf

    from tests.conftest import compose_config

    def broken(cfg, fresh_dir, ctx):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "_train", broken)
    monkeypatch.setattr("hydra.core.hydra_config.HydraConfig.get",
                        lambda: OmegaConf.create({"runtime": {"output_dir": str(tmp_path)}}))
    with pytest.raises(KeyError, match="a bug"):
        cli.train(compose_config())


@pytest.mark.slow
def test_an_error_during_the_run_is_noted_in_train_log(small_run_overrides, tmp_path):
    result = run_cli(small_run_overrides + ["training.subset_size=100000", "name=noted"])
    assert result.returncode == 2
    (run_dir,) = (tmp_path / "outputs" / "noted").iterdir()
    assert "detr-train: error: training.subset_size=100000" in (run_dir / "train.log").read_text()
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()


def test_a_group_chosen_with_a_dot_is_told_to_use_a_slash(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["detr-train", "data.augment=detr"])
    with pytest.raises(SystemExit):
        cli.main()
    assert "hint: data.augment is a config group: choose a preset with data/augment=<name>" in capsys.readouterr().err


def _truncated_copy(synthetic_root, tmp_path):
    """The shared synthetic dataset with every training image cut to half its bytes."""
    import shutil

    root = tmp_path / "truncated"
    shutil.copytree(synthetic_root, root)
    for image in (root / "train").glob("*.png"):
        data = image.read_bytes()
        image.write_bytes(data[: len(data) // 2])
    return root


@pytest.mark.slow
def test_an_error_in_a_dataloader_worker_is_its_own_one_line_message(small_run_overrides, synthetic_root, tmp_path):
    root = _truncated_copy(synthetic_root, tmp_path)
    result = run_cli(small_run_overrides + [f"data.root={root}", "data.num_workers=2"], timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("detr-train: error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert re.fullmatch(rf"detr-train: error: cannot read image {re.escape(str(root / 'train'))}/\S+\.png: "
                        r"image file is truncated.*", errors[0]), errors[0]
    assert "Traceback" not in result.stderr + result.stdout and "DataLoader worker" not in errors[0]


@pytest.mark.slow
@pytest.mark.parametrize("module", ["detr_train", "detr_train.cli.evaluate", "detr_train.cli.predict"])
def test_help_into_a_closed_pipe_ends_quietly(module):
    """`detr-train --help | head`: the reader is gone before the help is written."""
    process = subprocess.Popen([sys.executable, "-m", module, "--help"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, cwd=REPO_ROOT)
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 0
    assert stderr == ""
