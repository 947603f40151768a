"""AdamW with Deformable DETR's parameter groups, and the LR as a pure function of the step.

`LRSchedule.apply(step)` sets every group's LR from its base LR and the global optimiser
step, right before the step is taken. Nothing about the schedule is saved: a run resumed
at any step recomputes exactly the LR an uninterrupted run had there, and a record can
name the LR of any step (`lr_at`).
"""

from __future__ import annotations

import math

import torch

from detr_train.config.schema import ScheduleConfig, ScheduleName, TrainingConfig

# Parameters trained at a fraction of the base LR, as in the Deformable DETR paper:
# the backbone, and the projections that predict sampling offsets / reference points.
BACKBONE_KEYS = ("backbone",)
LINEAR_PROJ_KEYS = ("sampling_offsets", "reference_points")


def parameter_groups(model: torch.nn.Module, train_cfg: TrainingConfig) -> list[dict]:
    groups: dict[str, dict] = {
        "base": {"params": [], "lr": train_cfg.lr, "name": "base"},
        "backbone": {"params": [], "lr": train_cfg.lr * train_cfg.backbone_lr_mult, "name": "backbone"},
        "linear_proj": {"params": [], "lr": train_cfg.lr * train_cfg.linear_proj_lr_mult, "name": "linear_proj"},
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if any(key in name for key in BACKBONE_KEYS):
            groups["backbone"]["params"].append(param)
        elif any(key in name for key in LINEAR_PROJ_KEYS):
            groups["linear_proj"]["params"].append(param)
        else:
            groups["base"]["params"].append(param)
    return [g for g in groups.values() if g["params"]]


def build_optimizer(model: torch.nn.Module, train_cfg: TrainingConfig, *, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW; `fused` (CUDA) runs the update as one kernel and reads no per-parameter CPU step counter."""
    return torch.optim.AdamW(
        parameter_groups(model, train_cfg), weight_decay=train_cfg.weight_decay, fused=fused or None
    )


def lr_factor(step: int, *, total_steps: int, steps_per_epoch: int, schedule: ScheduleConfig) -> float:
    """Multiplier of the base LR at `step` (0-based global optimiser step)."""
    warmup = schedule.warmup_steps
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule.name == ScheduleName.constant:
        return 1.0
    if schedule.name == ScheduleName.step:
        epochs_done = step // max(1, steps_per_epoch)
        drops = sum(1 for e in schedule.step_epochs if epochs_done >= e)
        return schedule.gamma**drops
    floor = schedule.min_lr_ratio
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LRSchedule:
    """Warm-up then cosine / step / constant, over `total_steps` optimiser steps."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: ScheduleConfig, *, total_steps: int,
                 steps_per_epoch: int):
        self.optimizer = optimizer
        self.schedule = schedule
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        # Loading an optimizer state replaces its groups' LR: the bases are kept here.
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]

    def factor(self, step: int) -> float:
        return lr_factor(step, total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch,
                         schedule=self.schedule)

    def lr_at(self, step: int) -> float:
        """The LR of the first parameter group at `step`."""
        return self.base_lrs[0] * self.factor(step)

    def apply(self, step: int) -> None:
        factor = self.factor(step)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * factor
