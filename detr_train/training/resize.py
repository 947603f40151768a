"""Progressive resizing: the training resolution as a pure function of the epoch.

`resize_schedule` is a list of `[first_epoch, size]` pairs, epochs 1-based, e.g.
`[[1, 640], [20, 800], [40, 960]]`: epochs 1-19 at 640, 20-39 at 800, 40+ at 960.
Because the size is recomputed from the epoch number (never switched by an event),
a run resumed past a switch trains at the right size. The schedule is checked by
`detr_train.config.resize_schedule`.
"""

from __future__ import annotations


def size_for_epoch(schedule: list[tuple[int, int]], epoch: int, default: int) -> int:
    """The training shortest-edge size for a 1-based `epoch`."""
    size = default
    for first_epoch, entry_size in schedule:
        if epoch >= first_epoch:
            size = entry_size
    return size
