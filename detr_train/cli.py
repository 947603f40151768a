"""The `detr-train` command: Hydra composes the config, `run` does the work.

This module imports neither torch nor transformers at import time, so `--help` and
`--cfg job` answer in about a second.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from detr_train.config_path import config_dir

log = logging.getLogger("detr_train")


def train(cfg: DictConfig) -> float:
    """Hydra's task function. The only place that reads Hydra's runtime state."""
    from hydra.core.hydra_config import HydraConfig

    from detr_train.run import run

    fresh_dir = Path(HydraConfig.get().runtime.output_dir)
    resume = None
    if cfg.training.resume:
        from detr_train.resume import checkpoint_config_yaml, find_resume_target, reconcile_config
        from detr_train.rundir import adopt_run_dir

        resume = find_resume_target(str(cfg.training.resume), Path(str(cfg.output_root)), str(cfg.name))
        if resume is None:
            log.info("training.resume=auto: no resumable run under %s/%s; starting a new run", cfg.output_root, cfg.name)
        else:
            adopt_run_dir(resume.run_dir, fresh_dir)
            for reason in resume.skipped:
                log.warning("skipped checkpoint: %s", reason)
            cfg = reconcile_config(checkpoint_config_yaml(resume.payload), cfg)
    run_dir = resume.run_dir if resume is not None else fresh_dir
    return run(cfg, run_dir, resume=resume)


_hydra_main = hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(train)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
