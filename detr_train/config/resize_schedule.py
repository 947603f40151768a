"""`training.resize_schedule`: checked and normalised to `[(first_epoch, size), ...]`.

The schedule is a list of `[first_epoch, size]` pairs, epochs 1-based, starting at epoch
1, first epochs strictly increasing. `detr_train.training.resize` turns it into the size
of each epoch.
"""

from __future__ import annotations

from typing import Sequence

from detr_train.errors import ConfigError


class ResizeScheduleError(ConfigError):
    """A `training.resize_schedule` that cannot be followed; the message names the entry."""


def validate_resize_schedule(schedule) -> list[tuple[int, int]]:
    """Check and normalise a schedule; raises ResizeScheduleError naming the bad entry."""
    if schedule is None:
        return []
    key = "training.resize_schedule"
    if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence) and not hasattr(schedule, "__iter__"):
        raise ResizeScheduleError(f"{key} must be a list of [first_epoch, size] pairs, got {schedule!r}")
    entries = list(schedule)
    if not entries:
        raise ResizeScheduleError(f"{key} is empty; use null for a fixed size")
    pairs: list[tuple[int, int]] = []
    for position, entry in enumerate(entries):
        items = list(entry) if hasattr(entry, "__iter__") and not isinstance(entry, (str, bytes)) else None
        if items is None or len(items) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            raise ResizeScheduleError(
                f"{key}[{position}] = {entry!r} is not an integer [first_epoch, size] pair"
            )
        first_epoch, size = items
        if size <= 0:
            raise ResizeScheduleError(f"{key}[{position}]: size must be positive, got {size}")
        if first_epoch < 1:
            raise ResizeScheduleError(f"{key}[{position}]: epochs are 1-based, got first_epoch={first_epoch}")
        if pairs and first_epoch <= pairs[-1][0]:
            raise ResizeScheduleError(
                f"{key}[{position}]: first epochs must be strictly increasing ({pairs[-1][0]} then {first_epoch})"
            )
        pairs.append((first_epoch, size))
    if pairs[0][0] != 1:
        raise ResizeScheduleError(f"{key} must start at epoch 1 (first entry starts at epoch {pairs[0][0]})")
    return pairs
