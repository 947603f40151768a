"""A cheap, deterministic stand-in for training: a learning curve whose height depends on the params.

Shared by the app (run by the sweeper) and by the tests' plain Optuna loops, so both see
exactly the same intermediate values.
"""

from __future__ import annotations


def quality(x: float, y: float) -> float:
    """The height the curve saturates at: best at x=0.7, y=0.3."""
    return 1.0 - (x - 0.7) ** 2 - (y - 0.3) ** 2


def value_at(x: float, y: float, epoch: int) -> float:
    """The "validation mAP" after `epoch` (1-based) epochs: rises towards quality(x, y)."""
    return quality(x, y) * (1.0 - 0.5**epoch)
