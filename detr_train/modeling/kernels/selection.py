"""Which deformable attention every attention module of a model runs: Triton or PyTorch.

`auto` picks the fused Triton kernel only where it can run (CUDA, Triton importable) and
where it has just agreed with transformers' PyTorch path on a small problem in every
dtype the run computes in (`self_check`). Anything else keeps the PyTorch path and logs
one warning that says why; `triton` turns the same failures into one-line errors.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from detr_train.config.schema import AttentionKernel
from detr_train.errors import ConfigError
from detr_train.modeling.kernels.deformable_attention import (
    TritonMultiScaleDeformableAttention,
    triton_unavailable_reason,
)
from detr_train.modeling.kernels.self_check import kernel_problem

log = logging.getLogger(__name__)

_ATTENTION_CLASS = "DeformableDetrMultiscaleDeformableAttention"
_warned: set[str] = set()


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [module for module in model.modules() if type(module).__name__ == _ATTENTION_CLASS]


def auto_considers(device: torch.device) -> bool:
    """Whether `auto` tries Triton on this device at all. Not on CPU: Triton's interpreter
    is a test tool, far too slow to train with."""
    return device.type == "cuda"


def _indexed(device: torch.device) -> torch.device:
    # One self-check per physical device: `cuda` means the current one.
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def triton_problem(device: torch.device, dtypes: Iterable[torch.dtype]) -> str | None:
    """None when the Triton kernel can run on `device` and passes its self-check in every dtype."""
    reason = triton_unavailable_reason(device)
    for dtype in dtypes:
        if reason is not None:
            break
        reason = kernel_problem(_indexed(device), dtype)
    return reason


def _resolve_kind(kind: str, device: torch.device, dtypes: tuple[torch.dtype, ...]) -> str:
    try:
        kind = AttentionKernel(kind).value
    except ValueError:
        choices = [choice.value for choice in AttentionKernel]
        raise ConfigError(f"model.attention_kernel must be one of {choices}, got {kind!r}") from None
    if kind == "pytorch" or (kind == "auto" and not auto_considers(device)):
        return "pytorch"
    reason = triton_problem(device, dtypes)
    if reason is None:
        return "triton"
    if kind == "triton":
        raise ConfigError(
            f"model.attention_kernel=triton cannot run on {device}: {reason}. "
            f"Use model.attention_kernel=auto or pytorch."
        )
    if reason not in _warned:
        _warned.add(reason)
        log.warning("model.attention_kernel=auto keeps the PyTorch deformable attention: %s", reason)
    return "pytorch"


def _pytorch_attention() -> torch.nn.Module:
    from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention

    return MultiScaleDeformableAttention()


def install_attention_kernel(
    model: torch.nn.Module, kind: str, device: torch.device, dtypes: Iterable[torch.dtype] = (torch.float32,)
) -> str:
    """Choose the deformable attention implementation of every attention module of `model`.

    kind: "auto" (Triton on CUDA when it can run and passes its self-check in each of
    `dtypes`, the dtypes `value` will have; else PyTorch), "triton" (ConfigError where it
    cannot run or fails the check) or "pytorch" (transformers' implementation, restored if
    this function installed Triton before). Idempotent; the state_dict is unchanged since
    both implementations are parameter-free. Returns the kind used: "triton" or "pytorch".
    """
    device = torch.device(device)
    chosen = _resolve_kind(kind, device, tuple(dtypes))
    modules = _attention_modules(model)
    for module in modules:
        is_triton = isinstance(module.attn, TritonMultiScaleDeformableAttention)
        if chosen == "triton" and not is_triton:
            module.attn = TritonMultiScaleDeformableAttention()
        elif chosen == "pytorch" and is_triton:
            module.attn = _pytorch_attention()
    log.info("Deformable attention kernel: %s (model.attention_kernel=%s, %d modules)", chosen,
             AttentionKernel(kind).value, len(modules))
    return chosen
