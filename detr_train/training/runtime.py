"""The process around a run: which device, whether to draw progress bars."""

from __future__ import annotations

import sys

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


def show_progress(setting: bool | str) -> bool:
    return sys.stderr.isatty() if setting == "auto" else bool(setting)
