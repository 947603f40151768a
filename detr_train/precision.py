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


def resolve_precision(amp: bool, amp_dtype: str, device: torch.device) -> Precision:
    if amp_dtype not in _DTYPES:
        raise ValueError(f"training.amp_dtype must be one of {sorted(_DTYPES)}, got {amp_dtype!r}")
    dtype = _DTYPES[amp_dtype] if amp else None
    if amp and device.type != "cuda":
        log.warning("training.amp=true needs CUDA; running in fp32 on %s", device)
        dtype = None
    if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        log.warning("This GPU does not support bfloat16; using float16 with a GradScaler instead")
        dtype = torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    return Precision(device_type=device.type, dtype=dtype, scaler=scaler)
