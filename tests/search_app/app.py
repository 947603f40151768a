"""A Hydra app with a cheap objective, reporting through detr_train's reporter like the trainer does.

    python tests/search_app/app.py -m hydra.sweep.dir=/tmp/sweep x='interval(0,1)' y='interval(0,1)'
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

HERE = str(Path(__file__).resolve().parent)
sys.path.insert(0, HERE)
# submitit unpickles each job in a fresh interpreter, which must find `objective` too.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")]))
from objective import value_at  # noqa: E402

from detr_train.search.reporter import reporter_for  # noqa: E402

log = logging.getLogger("search_app")


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    reporter = reporter_for(cfg.trial)
    best, epochs_run = float("-inf"), 0
    for epoch in range(1, int(cfg.epochs) + 1):
        if cfg.crash_above_x is not None and cfg.x > cfg.crash_above_x:
            raise RuntimeError(f"deliberate crash: x={cfg.x} > {cfg.crash_above_x}")
        if cfg.interrupt_trial is not None and cfg.interrupt_trial == cfg.trial.number and epoch == 2:
            # What detr-train does on SIGTERM: stop, save, say so, return normally.
            reporter.interrupted("SIGTERM")
            break
        time.sleep(float(cfg.epoch_seconds))
        value = value_at(float(cfg.x), float(cfg.y), epoch)
        best, epochs_run = max(best, value), epoch
        reporter.report(epoch, value)
        if reporter.should_prune():
            log.info("pruned at epoch %d", epoch)
            break
    # What the tests check against the study: who ran this trial, with what, for how long.
    record = {"pid": os.getpid(), "x": cfg.x, "y": cfg.y, "epochs_run": epochs_run, "trial": cfg.trial.number, "best": best}
    (run_dir / "job.json").write_text(json.dumps(record))
    return best


if __name__ == "__main__":
    main()
