"""AdamW with Deformable DETR's parameter groups, and a warmup + cosine/step LR schedule.

The LR is a pure function of the global step (see `lr_factor`), so resuming at any
step reproduces the schedule exactly, whatever the scheduler's saved state says.
"""

from __future__ import annotations

import math

import torch

# Parameters trained at a fraction of the base LR, as in the Deformable DETR paper:
# the backbone, and the projections that predict sampling offsets / reference points.
BACKBONE_KEYS = ("backbone",)
LINEAR_PROJ_KEYS = ("sampling_offsets", "reference_points")


def parameter_groups(model: torch.nn.Module, train_cfg) -> list[dict]:
    groups: dict[str, dict] = {
        "base": {"params": [], "lr": float(train_cfg.lr), "name": "base"},
        "backbone": {"params": [], "lr": float(train_cfg.lr) * float(train_cfg.backbone_lr_mult), "name": "backbone"},
        "linear_proj": {
            "params": [],
            "lr": float(train_cfg.lr) * float(train_cfg.linear_proj_lr_mult),
            "name": "linear_proj",
        },
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


def build_optimizer(model: torch.nn.Module, train_cfg) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameter_groups(model, train_cfg), weight_decay=float(train_cfg.weight_decay))


def lr_factor(step: int, *, total_steps: int, steps_per_epoch: int, schedule_cfg) -> float:
    """Multiplier of the base LR at `step` (0-based global optimiser step)."""
    warmup = int(schedule_cfg.warmup_steps)
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    name = str(schedule_cfg.name)
    if name == "constant":
        return 1.0
    if name == "step":
        epochs_done = step // max(1, steps_per_epoch)
        drops = sum(1 for e in schedule_cfg.step_epochs if epochs_done >= int(e))
        return float(schedule_cfg.gamma) ** drops
    if name == "cosine":
        floor = float(schedule_cfg.min_lr_ratio)
        span = max(1, total_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"training.schedule.name must be one of cosine, step, constant; got {name!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, train_cfg, *, total_steps: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    schedule_cfg = train_cfg.schedule
    lr_factor(0, total_steps=total_steps, steps_per_epoch=steps_per_epoch, schedule_cfg=schedule_cfg)  # validate now
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, total_steps=total_steps, steps_per_epoch=steps_per_epoch, schedule_cfg=schedule_cfg),
    )
