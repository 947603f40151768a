"""The numbers of a metrics.jsonl record, as every tracker logs them.

One record is one epoch: `{"epoch": 3, "global_step": 36, "lr": 0.001, "train_loss": 1.2,
"map": 0.21, "map_per_class": {"circle": 0.3, ...}, "input_hw": [96, 96], ...}`. A tracker
charts its finite numbers; what is not one number (lists, strings, bools, None, NaN/inf) is
left out, and so is a class's AP of -1, COCOeval's "no ground truth" rather than a score.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping
from typing import Any

import torch

# COCOeval's per-class AP for a class without ground truth.
NO_GROUND_TRUTH = -1.0


def scalar(value: Any) -> float | None:
    """A finite float, or None for what is not one number (lists, strings, bools, None, NaN)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.item()
    # bool is an int to Python, but a flag is not a measurement worth a chart.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def record_numbers(record: Mapping[str, Any], skip: frozenset[str] = frozenset()) -> Iterator[tuple[str, str | None, float]]:
    """(key, name inside the key or None, value) for every finite number of `record`; a nested
    mapping (map_per_class) gives one per name. Keys in `skip` are left out."""
    for key, value in record.items():
        if key in skip:
            continue
        if isinstance(value, Mapping):
            for name, inner in value.items():
                number = scalar(inner)
                # AP -1 means "class has no ground truth", not a score: a chart of it misleads.
                if number is not None and number != NO_GROUND_TRUTH:
                    yield key, str(name), number
            continue
        number = scalar(value)
        if number is not None:
            yield key, None, number
