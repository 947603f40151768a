"""Moving a resumed run back into its original run directory.

Hydra creates a fresh output folder (and opens its log there) before `main` runs. A
resumed run must continue in the folder it started in: the log handler is pointed at
the original log (appending), the resumed config is saved beside the original one,
and the fresh, now unused folder is removed.
"""

from __future__ import annotations

import logging
import shutil
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from detr_train.checkpointing.atomic import append_durably, atomic_write

log = logging.getLogger(__name__)

LOG_FILE = "train.log"


def adopt_run_dir(original: Path, fresh: Path) -> None:
    """Log into `original`'s log from now on and drop Hydra's `fresh` folder.

    What this invocation logged so far (how it chose to resume) moves along into the original log.
    """
    original, fresh = original.resolve(), fresh.resolve()
    if original == fresh:
        return
    root = logging.getLogger()
    formatter = None
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).resolve().is_relative_to(fresh):
            formatter = handler.formatter
            root.removeHandler(handler)
            handler.close()
    fresh_log = fresh / LOG_FILE
    if fresh_log.is_file():
        append_durably(original / LOG_FILE, fresh_log.read_text())
    handler = logging.FileHandler(original / LOG_FILE, mode="a")
    if formatter is not None:
        handler.setFormatter(formatter)
    root.addHandler(handler)
    # The fresh folder only holds Hydra's bookkeeping of this invocation.
    if fresh.is_dir() and not any(p.name not in (".hydra", LOG_FILE) for p in fresh.iterdir()):
        shutil.rmtree(fresh, ignore_errors=True)
    log.info("Continuing in the original run directory %s", original)


def save_resumed_config(run_dir: Path, cfg: DictConfig) -> Path:
    """Keep the config of each resume next to the original one (which is never overwritten)."""
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return atomic_write(run_dir / ".hydra" / f"config.resumed_{stamp}.yaml", OmegaConf.to_yaml(cfg, resolve=True))
