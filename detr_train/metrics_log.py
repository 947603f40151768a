"""The per-epoch metric log: `metrics.jsonl`, one json object per line, appended."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


class MetricsLog:
    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(_json_safe(record)) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, epoch: int) -> int:
        """Drop records of epochs after `epoch` (written after the checkpoint being resumed).

        Returns how many were dropped. Keeps the log free of duplicate epochs when a run
        died between logging an epoch and checkpointing it.
        """
        records = self.read()
        kept = [r for r in records if int(r.get("epoch", 0)) <= epoch]
        if len(kept) != len(records):
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        return len(records) - len(kept)
