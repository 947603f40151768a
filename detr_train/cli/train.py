"""The `detr-train` command: Hydra composes the config, the resume plan decides, `run` trains.

Before Hydra makes a run directory, the config is composed once more here and checked
(`preflight`), so that a bad value or key stops with one line and leaves no files behind.
Expected errors during the run print one line too (`detr_train.errors`).

This module imports neither torch nor transformers at import time, so `--help` and
`--cfg job` answer in about a second.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from detr_train.config import config_dir
from detr_train.config.preflight import preflight
from detr_train.distributed.launch import DistContext, context_from_environment, launched_as_non_main_rank
from detr_train.errors import (
    ConfigError,
    DetrTrainError,
    exit_with_error,
    format_error,
    quiet_on_closed_pipe,
    take_verbose_flag,
    verbose,
)

log = logging.getLogger("detr_train")

# What a torchrun rank other than 0 adds to its command line: it writes nothing itself
# (no run dir, no .hydra, no log file) and uses the run dir that rank 0 broadcasts.
NON_MAIN_RANK_OVERRIDES = ("hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout")


def _in_search(cfg: DictConfig) -> bool:
    return OmegaConf.select(cfg, "trial.number") is not None


def train(cfg: DictConfig) -> float:
    """Hydra's task function. The only place that reads Hydra's runtime state."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return _train(cfg, Path(HydraConfig.get().runtime.output_dir), context_from_environment())
    except DetrTrainError as error:
        # A search trial fails with its error recorded by the sweeper; a plain run stops with one line.
        if _in_search(cfg) or verbose():
            raise
        _note_in_log_files(error)
        exit_with_error(error)


def _train(cfg: DictConfig, fresh_dir: Path, ctx: DistContext) -> float:
    from detr_train.cli.callbacks import build_callbacks
    from detr_train.config.checks import check_config
    from detr_train.distributed import collectives as distributed
    from detr_train.training.trainer import run

    # A search trial's sampled values reach the config only here.
    check_config(cfg)
    if ctx.enabled and _in_search(cfg):
        raise ConfigError(
            "a search trial cannot run under torchrun",
            hint="run searches through a Hydra launcher (hydra/launcher=joblib or slurm), one process per trial",
        )
    distributed.quiet_non_main_logging(ctx)
    distributed.start(ctx, cfg.training.device)
    try:
        the_plan = _plan_on_every_rank(cfg, fresh_dir, ctx)
        return run(the_plan, ctx, build_callbacks(the_plan.cfg))
    finally:
        distributed.stop(ctx)


def _plan_on_every_rank(cfg: DictConfig, fresh_dir: Path, ctx: DistContext):
    """Rank 0 plans (and moves into the run dir it chose); the other ranks receive its plan."""
    from detr_train.checkpointing.plan import plan
    from detr_train.checkpointing.rundir import adopt_run_dir
    from detr_train.distributed import collectives as distributed

    message = None
    if ctx.is_main:
        try:
            the_plan = plan(cfg, fresh_dir)
        except Exception as exc:
            distributed.broadcast_from_main(("error", f"{type(exc).__name__}: {exc}"), ctx)
            raise
        adopt_run_dir(the_plan.run_dir, fresh_dir)
        checkpoint = None if the_plan.checkpoint is None else str(the_plan.checkpoint)
        message = ("ok", (OmegaConf.to_container(the_plan.cfg, resolve=True, enum_to_str=True),
                          str(the_plan.run_dir), checkpoint))
    status, detail = distributed.broadcast_from_main(message, ctx)
    if ctx.is_main:
        return the_plan
    if status == "error":
        raise RuntimeError(f"rank 0 could not start the run: {detail}")
    return _plan_from_main(*detail)


def _plan_from_main(cfg_container: dict, run_dir: str, checkpoint: str | None):
    from detr_train.checkpointing.checkpointer import Found
    from detr_train.checkpointing.format import load_checkpoint
    from detr_train.checkpointing.plan import Plan
    from detr_train.config.schema import Config

    cfg = OmegaConf.merge(OmegaConf.structured(Config), cfg_container)
    found = None if checkpoint is None else Found(Path(checkpoint), load_checkpoint(Path(checkpoint)))
    return Plan(cfg, Path(run_dir), found)


def _note_in_log_files(error: DetrTrainError) -> None:
    """Say in train.log why the run stopped; the terminal gets the one-line error instead."""
    record = logging.LogRecord("detr_train", logging.ERROR, __file__, 0, format_error(error), None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


_hydra_main = hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(train)


def main() -> None:
    arguments = take_verbose_flag(sys.argv[1:])
    if launched_as_non_main_rank():
        arguments += NON_MAIN_RANK_OVERRIDES
    sys.argv[1:] = arguments
    with quiet_on_closed_pipe():
        try:
            preflight(arguments)
        except DetrTrainError as error:
            if verbose():
                raise
            exit_with_error(error)
        _hydra_main()


if __name__ == "__main__":
    main()
