"""What a benchmark ran on, printed and saved beside its numbers."""

from __future__ import annotations

import os
import platform

import torch


def environment(device: torch.device) -> dict:
    """The device and the versions that decide the numbers. Imports transformers and Triton
    when called, not before: a caller may have to set TRITON_INTERPRET first."""
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    cuda = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or 'unknown'}, "
                                                                    f"{torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if cuda else "n/a",
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
    }
