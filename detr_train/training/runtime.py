"""The process around a run: which device, seeded random generators, whether to draw progress bars."""

from __future__ import annotations

import random
import sys

import numpy as np
import torch

from detr_train.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"training.device={name!r} but CUDA is not available on this machine",
                          hint="use training.device=auto or cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def show_progress(setting: bool | str) -> bool:
    return sys.stderr.isatty() if setting == "auto" else bool(setting)
