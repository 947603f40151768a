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

log = logging.getLogger(__name__)

LOG_FILE = "train.log"


def adopt_run_dir(original: Path, fresh: Path, cfg: DictConfig) -> None:
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
    handler = logging.FileHandler(original / LOG_FILE, mode="a")
    if formatter is not None:
        handler.setFormatter(formatter)
    root.addHandler(handler)
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    resumed_config = original / ".hydra" / f"config.resumed_{stamp}.yaml"
    resumed_config.parent.mkdir(parents=True, exist_ok=True)
    resumed_config.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    # The fresh folder only holds Hydra's bookkeeping of this invocation.
    if not any(p.name not in (".hydra", LOG_FILE) for p in fresh.iterdir()):
        shutil.rmtree(fresh, ignore_errors=True)
    log.info("Continuing in the original run directory %s", original)
