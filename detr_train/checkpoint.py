"""Complete, atomic, code-free checkpoints.

A checkpoint is one dict of tensors and plain Python values, so it loads with
`torch.load(weights_only=True)`: a checkpoint file can never run code, and one that
tries to (or carries arbitrary pickled objects) is refused. It is written to a temp
file in the same folder, fsynced, then `os.replace`d, so a crash at any moment leaves
the previous checkpoint intact.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

# Checkpoint keys, named once.
KEY_FORMAT_VERSION = "format_version"
KEY_MODEL = "model"
KEY_OPTIMIZER = "optimizer"
KEY_LR_SCHEDULER = "lr_scheduler"
KEY_GRAD_SCALER = "grad_scaler"
KEY_EPOCH = "epoch"  # last fully completed epoch (1-based; 0 = none)
KEY_BATCH_IN_EPOCH = "batch_in_epoch"  # batches done in epoch+1; 0 at an epoch boundary
KEY_GLOBAL_STEP = "global_step"
KEY_BEST_METRIC = "best_metric"
KEY_BEST_EPOCH = "best_epoch"
KEY_LOSS_METER = "loss_meter"
KEY_RNG = "rng"
KEY_CONFIG_YAML = "config_yaml"
KEY_CLASS_NAMES = "class_names"
KEY_WORLD_SIZE = "world_size"
KEY_EFFECTIVE_BATCH_SIZE = "effective_batch_size"

REQUIRED_KEYS = (
    KEY_FORMAT_VERSION, KEY_MODEL, KEY_OPTIMIZER, KEY_LR_SCHEDULER, KEY_GRAD_SCALER, KEY_EPOCH,
    KEY_BATCH_IN_EPOCH, KEY_GLOBAL_STEP, KEY_BEST_METRIC, KEY_BEST_EPOCH, KEY_RNG, KEY_CONFIG_YAML,
)

LAST = "last.pt"
BEST = "best.pt"
_NUMBERED = re.compile(r"epoch_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


# --- RNG state as tensors / plain tuples (never numpy objects: weights_only refuses them)


def capture_rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch_cpu": torch.get_rng_state(),
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch_cpu"])
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            log.warning("checkpoint has %d CUDA RNG states, this machine %d devices: CUDA RNG not restored",
                        len(cuda_states), torch.cuda.device_count())


# --- save / load


def save_checkpoint(path: Path, payload: dict[str, Any]) -> Path:
    """Write `payload` atomically to `path` (temp file + fsync + os.replace)."""
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise ValueError(f"checkpoint payload is missing {missing}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    # Make the rename itself durable.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint; raises CheckpointError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted: not a torch checkpoint archive")
    try:
        # weights_only=True is the whole security story: never pass False here.
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        culprit = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(exc))
        raise CheckpointError(
            f"checkpoint {path} was refused: it holds objects other than tensors and plain values "
            f"(loading such a file could run code){f': {culprit.group(1)}' if culprit else ''}"
        ) from exc
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted: {first_line}") from exc
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path} is not a detr_train checkpoint (top level is {type(payload).__name__})")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a complete detr_train checkpoint: missing {missing}")
    if payload[KEY_FORMAT_VERSION] > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {payload[KEY_FORMAT_VERSION]}, newer than this "
            f"detr_train understands ({FORMAT_VERSION}); upgrade detr_train"
        )
    return payload


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Strictly load weights; a mismatch names the differing keys instead of half-loading."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        def show(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        parts = []
        if mismatched:
            parts.append("shape mismatch: " + show([f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched]))
        if missing:
            parts.append("missing: " + show(missing))
        if unexpected:
            parts.append("unexpected: " + show(unexpected))
        raise CheckpointError(f"checkpoint {source} does not fit this model ({'; '.join(parts)})")
    model.load_state_dict(state)


# --- numbered copies


def numbered_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}.pt"


def prune_numbered(checkpoint_dir: Path, keep_last: int) -> None:
    """Keep only the newest `keep_last` numbered epoch checkpoints."""
    numbered = sorted(
        (int(m.group(1)), p) for p in checkpoint_dir.glob("epoch_*.pt") if (m := _NUMBERED.search(p.name))
    )
    for _, stale in numbered[: max(0, len(numbered) - keep_last)]:
        stale.unlink(missing_ok=True)


def candidate_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Resumable checkpoints of a run, most advanced first (last, then numbered by epoch)."""
    numbered = sorted(
        ((int(m.group(1)), p) for p in checkpoint_dir.glob("epoch_*.pt") if (m := _NUMBERED.search(p.name))),
        reverse=True,
    )
    candidates = [checkpoint_dir / LAST] if (checkpoint_dir / LAST).exists() else []
    return candidates + [p for _, p in numbered]
