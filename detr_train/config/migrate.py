"""Configs saved by older detr-train releases (in checkpoints), brought to today's keys.

A checkpoint carries its run's config; resuming merges it into today's schema, so a key
that has since moved must be moved first. Each step says which release wrote the old form.
"""

from __future__ import annotations

import re
from typing import Any

# Keys that left the config, and what replaces them on the command line.
MOVED_KEYS = {
    "training.tensorboard": "logger=tensorboard",
}
_OVERRIDE_KEY = re.compile(r"^[+~]{0,2}([\w.]+)")


def moved_key_message(override: str) -> str | None:
    """One line for a command-line override of a key that has moved (`training.tensorboard=true`),
    naming what to write instead; None for any other override."""
    match = _OVERRIDE_KEY.match(override)
    key = match.group(1) if match else ""
    if key not in MOVED_KEYS:
        return None
    return f"{key} is no longer a key: experiment trackers are the `logger` group; use {MOVED_KEYS[key]} " \
           f"(several: logger=[tensorboard,mlflow]) instead of {override}"


def upgrade_config(saved: dict[str, Any]) -> dict[str, Any]:
    """`saved` (a plain container) with renamed or moved keys in today's places."""
    training = saved.get("training")
    if isinstance(training, dict):
        # Before the logger group, TensorBoard was switched by `training.tensorboard`.
        if training.pop("tensorboard", False):
            logger = saved.setdefault("logger", {})
            if isinstance(logger, dict):
                logger.setdefault("tensorboard", {})
        # Before the DETR recipe there was no EMA and no early stopping: both were off.
        training.setdefault("ema", {"enabled": False, "decay": 0.999, "warmup_steps": 200, "eval_raw": False})
        training.setdefault("early_stop", {"patience": 0, "min_delta": 0.0})
    data = saved.get("data")
    if isinstance(data, dict) and "hflip_prob" in data:
        # Format-1 checkpoints: the only augmentation was a flip, `data.hflip_prob`.
        flip = data.pop("hflip_prob")
        augment = data.setdefault("augment", {})
        augment.setdefault("hflip_prob", flip)
    return saved
