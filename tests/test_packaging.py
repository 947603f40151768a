"""A non-editable install finds the config tree and the sweeper plugin."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def test_wheel_ships_the_config_tree_and_runs_from_it(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO_ROOT), "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist")],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("detr_train-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "detr_train/conf/config.yaml" in names
    assert "detr_train/conf/training/smoke.yaml" in names
    assert any(n.startswith("hydra_plugins/detr_train_sweeper/") for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # Run from an unrelated folder with only the unpacked wheel on the path.
    env = dict(os.environ, PYTHONPATH=str(site))
    result = subprocess.run(
        [sys.executable, "-m", "detr_train", "training=smoke", "--cfg", "job"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "subset_size: 100" in result.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import detr_train.config as c; print(c.config_dir())"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env,
    )
    assert probe.stdout.strip() == str(site / "detr_train" / "conf")
