"""The fast paths a training model runs with, switched on in one place.

Always (any device; each is exactly equivalent to what it replaces):
- detr-train's own criterion as the model's `loss_function`: the Hungarian matcher crosses
  to the host once per step instead of once per decoder layer, with no `.all()` checks,
  `.item()` or CPU index tensors (`criterion.py`);
- encoder layers without their per-step `isfinite` host sync (`sync_free.py`).

Chosen by config:
- `model.attention_kernel`: the fused Triton deformable attention (`auto`: on CUDA, once it
  has passed its self-check against the PyTorch path in each dtype the run uses);
- on CUDA: TF32 matmuls for fp32 (`training.tf32`), the fused AdamW update
  (`training.fused_optimizer`: one kernel, no per-parameter CPU step counter to read),
  channels-last backbone convolutions (`training.channels_last`) and `torch.compile` of
  the backbone and encoder (`training.compile`).

With the fused kernel, or under autocast with the PyTorch path (grid_sample takes the
widest input, so it samples in fp32), deformable attention accumulates in fp32 while its
projections run in bf16/fp16: nothing is wrapped in an fp32 island.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from detr_train.config.schema import ModelConfig, TrainingConfig
from detr_train.modeling.criterion import DeformableDetrCriterion
from detr_train.modeling.precision import autocast_dtype
from detr_train.modeling.sync_free import remove_encoder_isfinite_sync

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FastPaths:
    criterion: DeformableDetrCriterion
    attention_kernel: str
    tf32: bool
    fused_optimizer: bool
    channels_last: bool
    compiled: bool

    def describe(self) -> str:
        return (f"attention kernel {self.attention_kernel}, TF32 {_on(self.tf32)}, fused AdamW "
                f"{_on(self.fused_optimizer)}, channels_last {_on(self.channels_last)}, "
                f"torch.compile {_on(self.compiled)}")


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def install_criterion(model: torch.nn.Module) -> DeformableDetrCriterion:
    """detr-train's sync-free criterion as `model.loss_function` (before any DDP/compile wrapper)."""
    criterion = DeformableDetrCriterion.from_config(model.config)
    model.loss_function = criterion
    return criterion


def set_tf32(enabled: bool) -> None:
    """TF32 tensor cores for fp32 matmuls and convolutions (about 10 mantissa bits, fp32 range)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def apply_fast_paths(model: torch.nn.Module, model_cfg: ModelConfig, train_cfg: TrainingConfig,
                     device: torch.device) -> FastPaths:
    """Switch the model (already on `device`) to its fast paths; returns what is on."""
    from detr_train.modeling.kernels.selection import install_attention_kernel

    cuda = device.type == "cuda"
    # The attention sees fp32 values, and under autocast also half ones: the kernel's
    # self-check covers each dtype it will compute in.
    half = autocast_dtype(train_cfg.amp, train_cfg.amp_dtype, device)
    dtypes = (torch.float32,) if half is None else (torch.float32, half)
    kernel = install_attention_kernel(model, model_cfg.attention_kernel, device, dtypes)
    criterion = install_criterion(model)
    remove_encoder_isfinite_sync(model)
    if cuda:
        set_tf32(train_cfg.tf32)
    channels_last = cuda and train_cfg.channels_last
    if channels_last:
        model.model.backbone.to(memory_format=torch.channels_last)
    compiled = cuda and train_cfg.compile
    if compiled:
        # In place (nn.Module.compile): parameter names, and so checkpoints, stay the same.
        model.model.backbone.compile()
        model.model.encoder.compile()
    paths = FastPaths(criterion, kernel, cuda and train_cfg.tf32, cuda and train_cfg.fused_optimizer, channels_last, compiled)
    log.info("Fast paths: %s", paths.describe())
    return paths
