"""Mixed precision: one code path for fp32, bf16 and fp16.

- fp16 needs a GradScaler (its range underflows small gradients); bf16 does not.
- Deformable attention's bilinear sampling is numerically fragile in half precision: it
  accumulates in fp32 (the fused kernel by design, the PyTorch path because grid_sample
  autocasts to its widest input), while its projections run in half precision.
- AMP is a CUDA feature here: elsewhere `amp=true` logs one warning and runs fp32.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Precision:
    device_type: str
    dtype: torch.dtype | None  # None: full fp32
    scaler: torch.amp.GradScaler

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


def autocast_dtype(amp: bool, amp_dtype: str, device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes in on `device`, or None for full fp32 (no warnings: see
    `resolve_precision`)."""
    if amp_dtype not in _DTYPES:
        raise ValueError(f"training.amp_dtype must be one of {sorted(_DTYPES)}, got {amp_dtype!r}")
    if not amp or device.type != "cuda":
        return None
    if _DTYPES[amp_dtype] is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return torch.float16
    return _DTYPES[amp_dtype]


def resolve_precision(amp: bool, amp_dtype: str, device: torch.device) -> Precision:
    dtype = autocast_dtype(amp, amp_dtype, device)
    if amp and device.type != "cuda":
        log.warning("training.amp=true needs CUDA; running in fp32 on %s", device)
    elif amp and dtype is not _DTYPES[amp_dtype]:
        log.warning("This GPU does not support bfloat16; using float16 with a GradScaler instead")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    return Precision(device_type=device.type, dtype=dtype, scaler=scaler)
