"""The `detr-train` command: Hydra composes the config, `run` does the work.

This module imports neither torch nor transformers at import time, so `--help` and
`--cfg job` answer in about a second.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from detr_train.config_path import config_dir
from detr_train.launch_env import launched_as_non_main_rank

log = logging.getLogger("detr_train")

# What a torchrun rank other than 0 adds to its command line: it writes nothing itself
# (no run dir, no .hydra, no log file) and uses the run dir that rank 0 broadcasts.
NON_MAIN_RANK_OVERRIDES = ("hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout")


def _resolve_run(cfg: DictConfig, fresh_dir: Path):
    """(config, run dir, resume target or None) for this invocation; reads checkpoints, not Hydra."""
    from detr_train.resume import (
        checkpoint_config_yaml,
        find_resume_target,
        reconcile_config,
        resume_in_place,
    )
    from detr_train.rundir import adopt_run_dir

    if cfg.training.resume:
        resume = find_resume_target(str(cfg.training.resume), Path(str(cfg.output_root)), str(cfg.name))
        if resume is None:
            log.info("training.resume=auto: no resumable run under %s/%s; starting a new run", cfg.output_root, cfg.name)
    else:
        # Same run dir as before (a fixed hydra.run.dir, a requeued SLURM job, a search
        # trial run again): continue there rather than overwrite its checkpoints.
        resume = resume_in_place(fresh_dir)
    if resume is None:
        return cfg, fresh_dir, None
    adopt_run_dir(resume.run_dir, fresh_dir)
    for reason in resume.skipped:
        log.warning("skipped checkpoint: %s", reason)
    return reconcile_config(checkpoint_config_yaml(resume.payload), cfg), resume.run_dir, resume


def train(cfg: DictConfig) -> float:
    """Hydra's task function. The only place that reads Hydra's runtime state."""
    from hydra.core.hydra_config import HydraConfig

    from detr_train import distributed
    from detr_train.run import run

    ctx = distributed.context_from_environment()
    if ctx.enabled and cfg.get("trial") is not None and cfg.trial.number is not None:
        raise ValueError(
            "a search trial cannot run under torchrun; run searches through a Hydra launcher "
            "(hydra/launcher=joblib or submitit_slurm), one process per trial"
        )
    distributed.quiet_non_main_logging(ctx)
    distributed.start(ctx, str(cfg.training.device))
    try:
        plan = None
        if ctx.is_main:
            try:
                cfg, run_dir, resume = _resolve_run(cfg, Path(HydraConfig.get().runtime.output_dir))
            except Exception as exc:
                distributed.broadcast_from_main(("error", f"{type(exc).__name__}: {exc}"), ctx)
                raise
            checkpoint = None if resume is None else str(resume.checkpoint)
            plan = ("ok", (OmegaConf.to_container(cfg, resolve=True), str(run_dir), checkpoint))
        status, detail = distributed.broadcast_from_main(plan, ctx)
        if not ctx.is_main:
            if status == "error":
                raise RuntimeError(f"rank 0 could not start the run: {detail}")
            cfg, run_dir, resume = _plan_on_other_rank(*detail)
        return run(cfg, run_dir, resume=resume, dist_ctx=ctx)
    finally:
        distributed.stop(ctx)


def _plan_on_other_rank(cfg_container: dict, run_dir: str, checkpoint: str | None):
    from detr_train.checkpoint import load_checkpoint
    from detr_train.resume import ResumeTarget

    resume = None if checkpoint is None else ResumeTarget(Path(checkpoint), load_checkpoint(Path(checkpoint)), Path(run_dir))
    return OmegaConf.create(cfg_container), Path(run_dir), resume


_hydra_main = hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(train)


def main() -> None:
    if launched_as_non_main_rank():
        sys.argv.extend(NON_MAIN_RANK_OVERRIDES)
    _hydra_main()


if __name__ == "__main__":
    main()
