"""The per-epoch metric log: `metrics.jsonl`, one json object per line, appended durably."""

from __future__ import annotations

import json
import math
from pathlib import Path

from detr_train.checkpointing.atomic import append_durably, atomic_write


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def _line(record: dict) -> str:
    return json.dumps(_json_safe(record)) + "\n"


METRICS_LOG_FILE = "metrics.jsonl"


class MetricsLog:
    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def of_run(cls, run_dir: Path) -> MetricsLog:
        """The metric log of the run in `run_dir`."""
        return cls(Path(run_dir) / METRICS_LOG_FILE)

    def append(self, record: dict) -> None:
        append_durably(self.path, _line(record))

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, epoch: int) -> int:
        """Drop records of epochs after `epoch` (written after the checkpoint being resumed).

        Returns how many were dropped. Keeps the log free of duplicate epochs when a run
        died between logging an epoch and checkpointing it.
        """
        if not self.path.exists():
            return 0
        lines = self.path.read_text().splitlines()
        # A kill during an append can leave half a line at the end: it belongs to no epoch.
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        kept = [r for r in records if int(r.get("epoch", 0)) <= epoch]
        if len(kept) != len([line for line in lines if line.strip()]):
            atomic_write(self.path, "".join(_line(r) for r in kept))
        return len(records) - len(kept)
