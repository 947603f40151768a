"""Level 1: every option of every config group composes; bad overrides fail clearly."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from detr_train.config import config_dir
from tests.conftest import compose_config, run_cli

GROUPS = ["model", "data", "training", "budget", "logger"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes(group, option):
    cfg = compose_config([f"{group}={option}", "data.root=/some/where"])
    # Resolving everything catches broken interpolations, not just missing files.
    container = OmegaConf.to_container(cfg, resolve=True)
    assert container[group] is not None


def test_expected_options_exist():
    assert {"deformable_detr", "deformable_detr_tiny"} <= set(_options("model"))
    assert {"synthetic", "coco", "bdd100k"} <= set(_options("data"))
    assert {"default", "smoke", "overfit"} <= set(_options("training"))
    assert {"none", "small", "tiny"} <= set(_options("budget"))
    assert {"none", "tensorboard", "mlflow", "many"} <= set(_options("logger"))


def test_seed_design_keys_have_their_defaults():
    cfg = compose_config()
    training = cfg.training
    assert training.resume is None and training.amp is False
    assert training.subset_size is None and training.subset_seed == 42
    assert training.overfit is False and training.resize_schedule is None


def test_smoke_and_overfit_presets():
    smoke = compose_config(["training=smoke"]).training
    assert (smoke.subset_size, smoke.epochs) == (100, 2)
    overfit = compose_config(["training=overfit"]).training
    assert overfit.overfit is True and overfit.overfit_size == 10


def test_unknown_group_option_is_a_clear_error():
    with pytest.raises(ConfigCompositionException, match="nonexistent"):
        compose_config(["model=nonexistent"])


def test_unknown_key_is_a_clear_error():
    with pytest.raises(ConfigCompositionException, match="training.no_such_key"):
        compose_config(["training.no_such_key=1"])


@pytest.mark.slow
def test_cli_bad_override_names_the_key(tmp_path):
    result = run_cli(["training.no_such_key=1", f"output_root={tmp_path}"], timeout=60)
    assert result.returncode != 0
    assert "training.no_such_key" in result.stderr


@pytest.mark.slow
def test_cfg_job_does_not_import_torch(tmp_path):
    # --cfg job must answer fast: torch/transformers stay off the config path.
    code = (
        "import sys; sys.argv=['detr-train','--cfg','job'];\n"
        "from detr_train.cli import train as cli\n"
        "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'transformers' not in sys.modules, 'transformers imported'\n"
    )
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "deformable_detr_tiny" in result.stdout
