"""The `hf` export: a folder `from_pretrained` loads (weights, config, image processor)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from detr_train.checkpointing.atomic import fsync_dir
from detr_train.config.schema import ModelConfig
from detr_train.errors import ExportError
from detr_train.modeling.build import uses_swapped_group_norm

log = logging.getLogger(__name__)


def hf_export_problem(model_cfg: ModelConfig) -> str | None:
    """Why this model cannot be saved as a save_pretrained folder, or None."""
    if uses_swapped_group_norm(model_cfg):
        return ("this model's backbone (model.backbone.type=resnet with norm=group_norm) cannot be rebuilt by "
                "from_pretrained; train with model.backbone.type=bit to export")
    return None


def save_pretrained_folder(model: torch.nn.Module, processor, model_cfg: ModelConfig, target: Path) -> Path:
    """`save_pretrained` of the model and its image processor into `target`, written beside it
    and renamed into place, so that a killed export never leaves half a folder under the name."""
    problem = hf_export_problem(model_cfg)
    if problem is not None:
        raise ExportError(f"not exported: {problem}")
    target = Path(target)
    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    fsync_dir(target.parent)
    return target
