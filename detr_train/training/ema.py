"""Exponential moving average of the model's weights, updated after every optimiser step.

    ema = d * ema + (1 - d) * weights,   d = decay * (1 - exp(-updates / warmup_steps))

The warm-up (RF-DETR's and Ultralytics' form) lets the average follow the fast early
changes of a fresh model instead of dragging its random initial weights along. The
average lives in a full copy of the model in eval mode, so evaluating or exporting it is
evaluating or exporting a normal model. Its state (weights and update count) is
checkpointed; every DDP rank updates from identical weights, so all hold the same EMA.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from detr_train.checkpointing.state import StrictWeights


class ModelEMA:
    """The average of `model`'s weights; `update()` after each optimiser step of `model`."""

    def __init__(self, model: torch.nn.Module, *, decay: float, warmup_steps: int):
        self.source = model
        self.module = copy.deepcopy(model).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self.decay = decay
        self.warmup_steps = warmup_steps
        self.updates = 0

    def decay_at(self, updates: int) -> float:
        if self.warmup_steps <= 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-updates / self.warmup_steps))

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the source model's current weights."""
        self.updates += 1
        weight = 1.0 - self.decay_at(self.updates)
        averaged, current = [], []
        for ema_tensor, model_tensor in zip(self.module.state_dict().values(), self.source.state_dict().values()):
            if ema_tensor.is_floating_point():
                averaged.append(ema_tensor)
                current.append(model_tensor.detach())
            else:  # counters and the like are copied, not averaged
                ema_tensor.copy_(model_tensor)
        # One fused update for all tensors: ema += weight * (current - ema).
        torch._foreach_lerp_(averaged, current, weight)

    @torch.no_grad()
    def reset(self) -> None:
        """Restart the average at the source model's weights (a checkpoint written without EMA)."""
        self.module.load_state_dict(self.source.state_dict())
        self.updates = 0

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        StrictWeights(self.module).load_state_dict(state["weights"])
        self.updates = int(state["updates"])
