"""The checkpoint file format: one dict of tensors and plain values, code-free.

A checkpoint loads with `torch.load(weights_only=True)`: a checkpoint file can never run
code, and one that tries to (or carries arbitrary pickled objects) is refused. Format 2
holds, under named keys, the state dict of every stateful part of a run plus what is
needed to rebuild the run around them:

    format_version   2
    config_yaml      the composed config of the run, as YAML text
    class_names      the dataset's classes, in label order
    model, optimizer, grad_scaler, train, rng, ...   one state dict per stateful part

Format 1 (the first release: flat keys, an LR-scheduler state) is upgraded on load, so
runs started with it resume.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from detr_train.checkpointing.atomic import atomic_write
from detr_train.errors import DetrTrainError

FORMAT_VERSION = 2

KEY_FORMAT_VERSION = "format_version"
KEY_CONFIG_YAML = "config_yaml"
KEY_CLASS_NAMES = "class_names"
# The model's transformers config (JSON text): a resume rebuilds the very architecture it
# trained, without fetching pretrained weights again.
KEY_MODEL_CONFIG = "model_config"

# The stateful parts every run checkpoints (more may be added, e.g. EMA weights).
STATE_MODEL = "model"
STATE_OPTIMIZER = "optimizer"
STATE_GRAD_SCALER = "grad_scaler"
STATE_TRAIN = "train"
STATE_RNG = "rng"
STATE_EMA = "ema"  # with training.ema.enabled

REQUIRED_KEYS = (KEY_FORMAT_VERSION, KEY_CONFIG_YAML, STATE_MODEL, STATE_OPTIMIZER, STATE_GRAD_SCALER,
                 STATE_TRAIN, STATE_RNG)

# Format 1 kept the train state as flat top-level keys.
_V1_TRAIN_KEYS = ("epoch", "batch_in_epoch", "global_step", "best_metric", "best_epoch", "loss_meter",
                  "world_size", "effective_batch_size")
_V1_REQUIRED = ("format_version", "model", "optimizer", "lr_scheduler", "grad_scaler", "epoch", "batch_in_epoch",
                "global_step", "best_metric", "best_epoch", "rng", "config_yaml")


class CheckpointError(DetrTrainError, RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def save_checkpoint(path: Path, payload: dict[str, Any]) -> Path:
    """Write `payload` atomically to `path`: a crash at any moment leaves the previous file intact."""
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise ValueError(f"checkpoint payload is missing {missing}")
    return atomic_write(Path(path), lambda handle: torch.save(payload, handle))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load, check and (if older) upgrade a checkpoint; raises CheckpointError naming the file."""
    path = Path(path)
    payload = _read(path, map_location)
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path} is not a detr_train checkpoint (top level is {type(payload).__name__})")
    version = payload.get(KEY_FORMAT_VERSION)
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version}, newer than this detr_train understands "
            f"({FORMAT_VERSION})", hint="upgrade detr_train",
        )
    if version == 1:
        payload = _upgrade_from_format_1(payload, path)
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a complete detr_train checkpoint: missing {missing}")
    return payload


def train_state_of(payload: dict[str, Any]) -> dict[str, Any]:
    """The train state (epoch, batch, step, best...) of a loaded checkpoint."""
    return payload[STATE_TRAIN]


def _read(path: Path, map_location) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted: not a torch checkpoint archive")
    try:
        # weights_only=True is the whole security story: never pass False here.
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        culprit = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(exc))
        raise CheckpointError(
            f"checkpoint {path} was refused: it holds objects other than tensors and plain values "
            f"(loading such a file could run code){f': {culprit.group(1)}' if culprit else ''}"
        ) from exc
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted: {first_line}") from exc


def _upgrade_from_format_1(payload: dict[str, Any], path: Path) -> dict[str, Any]:
    missing = [k for k in _V1_REQUIRED if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a complete detr_train checkpoint: missing {missing}")
    # The LR is now a pure function of the global step, so the scheduler's state is dropped.
    upgraded = {k: v for k, v in payload.items() if k not in _V1_TRAIN_KEYS and k != "lr_scheduler"}
    upgraded[KEY_FORMAT_VERSION] = FORMAT_VERSION
    upgraded[STATE_TRAIN] = {k: payload[k] for k in _V1_TRAIN_KEYS if k in payload}
    return upgraded
