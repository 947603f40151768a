"""The stateful parts of a run that are not torch objects: where training stands, the
running loss sums, the RNG streams, and the model's weights loaded strictly.

Each owns `state_dict()` / `load_state_dict()`, like the optimizer and the grad scaler,
so the Checkpointer saves and restores all of them the same way. State dicts hold only
tensors and plain Python values, so checkpoints load with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


class StateMismatch(ValueError):
    """A saved state that does not fit this run; the Checkpointer adds the file's name."""


@dataclass
class LossMeter:
    """Running sums of the loss components over an epoch (mid-epoch checkpoints keep them)."""

    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0
    skipped: int = 0
    consecutive_nonfinite: int = 0

    def add(self, losses: dict[str, float]) -> None:
        for key, value in losses.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1

    def means(self) -> dict[str, float]:
        return {key: value / max(1, self.count) for key, value in self.sums.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "count": self.count, "skipped": self.skipped,
                "consecutive_nonfinite": self.consecutive_nonfinite}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = {str(k): float(v) for k, v in state["sums"].items()}
        self.count = int(state["count"])
        self.skipped = int(state["skipped"])
        self.consecutive_nonfinite = int(state["consecutive_nonfinite"])


@dataclass(frozen=True)
class StepLayout:
    """How this run's epochs are cut into batches and optimiser steps: what a position means,
    and what it meant to the run that wrote a checkpoint."""

    world_size: int = 1
    batch_size: int = 1  # per process and micro-batch
    batches_per_epoch: int = 1  # per process
    accumulate: int = 1  # micro-batches per optimiser step

    @property
    def steps_per_epoch(self) -> int:
        return self.steps_in(self.batches_per_epoch)

    def steps_in(self, batches: int) -> int:
        """Optimiser steps of an epoch of `batches` loader batches (a last partial group steps too)."""
        return -(-batches // self.accumulate)

    @property
    def effective_batch_size(self) -> int:
        return self.world_size * self.batch_size * self.accumulate


@dataclass
class TrainState:
    """Where the run stands. Epochs are 1-based; `epoch` is the last one completed."""

    epoch: int = 0
    batch_in_epoch: int = 0  # loader batches (micro-batches) done in epoch `epoch + 1`
    global_step: int = 0  # optimiser steps done
    best_metric: float = -1.0
    best_epoch: int = 0
    best_weights: str = "model"  # which weights scored best_metric: "model" or "ema"
    meter: LossMeter = field(default_factory=LossMeter)
    layout: StepLayout = field(default_factory=StepLayout, compare=False)

    def start_epoch(self) -> None:
        """A fresh epoch starts with fresh loss sums; a resumed one keeps its own."""
        if self.batch_in_epoch == 0:
            self.meter = LossMeter()

    def finish_epoch(self, epoch: int) -> None:
        self.epoch, self.batch_in_epoch = epoch, 0

    def observe(self, epoch: int, metric: float, weights: str = "model") -> bool:
        """Record an epoch's validation metric; True when it is the best so far."""
        if metric <= self.best_metric:
            return False
        self.best_metric, self.best_epoch, self.best_weights = metric, epoch, weights
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "global_step": self.global_step,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "best_weights": self.best_weights,
            "loss_meter": self.meter.state_dict(),
            "world_size": self.layout.world_size,
            "effective_batch_size": self.layout.effective_batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.global_step = int(state["global_step"])
        self.best_metric = float(state["best_metric"])
        self.best_epoch = int(state["best_epoch"])
        self.best_weights = str(state.get("best_weights", "model"))
        self.meter = LossMeter()
        if self.batch_in_epoch and state.get("loss_meter") is not None:
            self.meter.load_state_dict(state["loss_meter"])
        saved_world_size = int(state.get("world_size", 1))
        if saved_world_size != self.layout.world_size:
            self._continue_with_another_world_size(saved_world_size)

    def _continue_with_another_world_size(self, saved_world_size: int) -> None:
        """Map the position in the epoch, and so the LR schedule, onto this run's steps per epoch.

        Every rank walks its strided share of one global order per epoch, so `b` batches on
        `n` ranks have used the first b x batch x n images of that order, whatever `n` is.
        """
        layout = self.layout
        used = self.batch_in_epoch * layout.batch_size * saved_world_size
        # Positions fall on optimiser-step boundaries: whole accumulation windows.
        steps_done = min(used // layout.effective_batch_size, layout.steps_per_epoch)
        batch_in_epoch = min(steps_done * layout.accumulate, layout.batches_per_epoch)
        step = self.epoch * layout.steps_per_epoch + steps_done
        log.warning(
            "resume: the checkpoint was written by %d process(es) (effective batch %d), this run has %d "
            "(effective batch %d); continuing epoch %d at batch %d of %d and the LR schedule at step %d "
            "(was %d). The learning rate is not rescaled.",
            saved_world_size, layout.batch_size * layout.accumulate * saved_world_size, layout.world_size,
            layout.effective_batch_size, self.epoch + 1, batch_in_epoch, layout.batches_per_epoch, step,
            self.global_step,
        )
        self.batch_in_epoch, self.global_step = batch_in_epoch, step


class RngState:
    """Python, numpy, torch CPU and CUDA RNG streams, as tensors and plain tuples
    (never numpy objects: `weights_only` loading refuses them)."""

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
        return {
            "python": random.getstate(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
            "torch_cpu": torch.get_rng_state(),
            "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
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


class StrictWeights:
    """A module's weights, loaded all or nothing: a mismatch names the differing keys
    instead of half-loading."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def state_dict(self) -> dict[str, Any]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        problems = weight_mismatches(self.module.state_dict(), state)
        if problems:
            raise StateMismatch(f"does not fit this model ({problems})")
        self.module.load_state_dict(state)


def weight_mismatches(own: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> str:
    """'' when `saved` fits `own` key for key and shape for shape, else what differs."""
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    mismatched = sorted(k for k in set(own) & set(saved) if own[k].shape != saved[k].shape)

    def show(keys: list[str]) -> str:
        return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

    parts = []
    if mismatched:
        parts.append("shape mismatch: " + show([f"{k} {tuple(saved[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched]))
    if missing:
        parts.append("missing: " + show(missing))
    if unexpected:
        parts.append("unexpected: " + show(unexpected))
    return "; ".join(parts)
