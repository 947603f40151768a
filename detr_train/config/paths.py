"""Where the Hydra config tree lives (checkout or wheel), and the resolvers it uses."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

# detr_train/ (this file lives in detr_train/config/).
_PACKAGE_DIR = Path(__file__).resolve().parent.parent


def config_dir() -> Path:
    """The `conf/` folder: top level of a checkout, or `detr_train/conf` inside a wheel."""
    for candidate in (_PACKAGE_DIR.parent / "conf", _PACKAGE_DIR / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"detr_train's config tree was not found next to {_PACKAGE_DIR}: expected conf/config.yaml "
        "in the source checkout or detr_train/conf/config.yaml in the installed package"
    )


def run_id() -> str:
    """The last part of a run dir: the SLURM job id on a cluster, else the start time.

    A SLURM job keeps its id when it is requeued after pre-emption, so the requeued job
    lands in the same run dir and picks up its checkpoint there by itself.
    """
    job_id = os.environ.get("SLURM_JOB_ID")
    if job_id:
        array_task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"slurm_{job_id}" + (f"_{array_task}" if array_task else "")
    return datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


# Registered on import: every process that composes our config (the CLI, a launcher's
# worker, the tests) imports this module first.
OmegaConf.register_new_resolver("detr_run_id", run_id, use_cache=True, replace=True)
