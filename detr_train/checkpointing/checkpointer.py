"""Where a run's checkpoints live, and the one object that writes and restores them.

Layout of a run directory's `checkpoints/`:

    last.pt            after every epoch (and every `every_n_steps` steps); what a resume continues
    best.pt            a copy of last.pt from the epoch with the best validation mAP so far
    epoch_NNNN.pt      numbered copies, the newest `keep_last` kept

Invariants, whatever moment a crash (kill -9) lands on:
- every file here is complete and loadable, or absent: each is written by `atomic_write`;
- `best.pt` holds the epoch that the newest `last.pt` names as its best. A save writes
  last.pt first and best.pt right after, so the only gap a crash can leave is a best.pt
  one step behind a last.pt that ends the best epoch; `repair_best` mends that from
  last.pt (or a numbered copy) before training continues;
- temp files of a killed save are swept when a run starts in the directory.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from torch.distributed.checkpoint.stateful import Stateful

from detr_train.checkpointing.atomic import atomic_write, remove_temp_files
from detr_train.checkpointing.format import (
    KEY_CLASS_NAMES,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    train_state_of,
)
from detr_train.checkpointing.state import StateMismatch
from detr_train.distributed.launch import SINGLE_PROCESS, DistContext

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"
_NUMBERED = re.compile(r"^epoch_(\d+)\.pt$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def run_dir_of(checkpoint: Path) -> Path:
    """Checkpoints live in <run dir>/checkpoints/; a file elsewhere is its own folder's."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINT_DIR else checkpoint.parent


def numbered_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}.pt"


def _numbered(folder: Path) -> list[tuple[int, Path]]:
    """Numbered epoch checkpoints in `folder`, oldest first."""
    found = ((m, p) for p in folder.glob("epoch_*.pt") if (m := _NUMBERED.match(p.name)))
    return sorted((int(m.group(1)), p) for m, p in found)


def candidates(run_dir: Path) -> list[Path]:
    """A run's resumable checkpoints, most advanced first: last.pt, then numbered copies, newest first."""
    folder = checkpoint_dir(run_dir)
    last = [folder / LAST] if (folder / LAST).exists() else []
    return last + [p for _, p in reversed(_numbered(folder))]


@dataclass
class Found:
    """A checkpoint chosen for resuming, and the damaged ones passed over on the way."""

    path: Path
    payload: dict[str, Any]
    skipped: list[str] = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return run_dir_of(self.path)


def first_intact(run_dir: Path) -> Found | None:
    """The most advanced checkpoint of `run_dir` that loads; None if it has none at all.

    Raises CheckpointError when it has checkpoints but none of them loads: starting over
    would overwrite what is left of that run.
    """
    skipped: list[str] = []
    for path in candidates(run_dir):
        try:
            return Found(path, load_checkpoint(path), skipped)
        except CheckpointError as exc:
            skipped.append(str(exc))
    if not skipped:
        return None
    raise CheckpointError(f"run dir {run_dir} has no intact checkpoint to resume from ({'; '.join(skipped)})")


def newest_resumable(runs_root: Path) -> tuple[Found | None, list[str]]:
    """The newest run under `runs_root` with an intact checkpoint (for `training.resume=auto`)."""
    run_dirs = {p.parent.parent for p in Path(runs_root).glob(f"*/{CHECKPOINT_DIR}/*.pt")}
    newest_first = sorted(
        run_dirs, key=lambda d: max(f.stat().st_mtime for f in checkpoint_dir(d).glob("*.pt")), reverse=True
    )
    skipped: list[str] = []
    for run_dir in newest_first:
        try:
            found = first_intact(run_dir)
        except CheckpointError as exc:
            skipped.append(str(exc))
            continue
        if found is not None:
            found.skipped = skipped + found.skipped
            return found, []
    return None, skipped


def _copy_file(source: Path, destination: Path) -> None:
    # Real copies, not links: best.pt and numbered copies are the fallback when last.pt is damaged.
    with source.open("rb") as src:
        atomic_write(destination, lambda handle: shutil.copyfileobj(src, handle, 1 << 24))


class Checkpointer:
    """Saves and restores every stateful part of a run as one checkpoint.

    `states` maps a checkpoint key to an object with `state_dict`/`load_state_dict`;
    adding a piece of state to the run is adding one entry. Restoring loads them in
    the mapping's order, all or nothing per part, naming the file on any mismatch.
    Only the main process writes.
    """

    def __init__(
        self, run_dir: Path, states: Mapping[str, Stateful], metadata: Mapping[str, Any],
        dist: DistContext = SINGLE_PROCESS, *, keep_last: int = 0,
        optional: Mapping[str, Callable[[], None]] | None = None,
    ):
        self.folder = checkpoint_dir(run_dir)
        self.states = dict(states)
        self.metadata = dict(metadata)
        self.dist = dist
        self.keep_last = keep_last
        # Parts older checkpoints may lack, and what to do then (after the parts before them loaded).
        self.optional = dict(optional or {})

    def register(self, name: str, state: Stateful, *, on_missing: Callable[[], None] | None = None) -> None:
        """Checkpoint one more part; `on_missing` runs when a checkpoint written without it is restored."""
        self.states[name] = state
        if on_missing is not None:
            self.optional[name] = on_missing

    def collect(self, parts: Iterable[object]) -> None:
        """Checkpoint every part that declares a `state_key` (stateful callbacks). A checkpoint
        written before such a part existed leaves it in its fresh state."""
        for part in parts:
            key = getattr(part, "state_key", None)
            if key is not None:
                self.register(key, part, on_missing=lambda: None)

    @property
    def last(self) -> Path:
        return self.folder / LAST

    @property
    def best(self) -> Path:
        return self.folder / BEST

    def payload(self) -> dict[str, Any]:
        return {**self.metadata, **{name: state.state_dict() for name, state in self.states.items()}}

    def save(self, *, is_best: bool = False, epoch_end: int | None = None) -> Path | None:
        """Write last.pt, then best.pt (when `is_best`) and the numbered copy of `epoch_end`."""
        if not self.dist.is_main:
            return None
        save_checkpoint(self.last, self.payload())
        if is_best:
            _copy_file(self.last, self.best)
        if epoch_end is not None and self.keep_last > 0:
            _copy_file(self.last, self.folder / numbered_name(epoch_end))
            for _, stale in _numbered(self.folder)[: -self.keep_last]:
                stale.unlink(missing_ok=True)
        return self.last

    def restore(self, payload: dict[str, Any], source: Path) -> None:
        saved_classes = payload.get(KEY_CLASS_NAMES)
        expected = self.metadata.get(KEY_CLASS_NAMES)
        if saved_classes is not None and expected is not None and list(saved_classes) != list(expected):
            raise CheckpointError(
                f"checkpoint {source} was trained on classes {list(saved_classes)}, but the dataset has {list(expected)}"
            )
        for name, state in self.states.items():
            if name not in payload:
                if name in self.optional:
                    log.info("checkpoint %s has no %s state; starting it fresh", source.name, name)
                    self.optional[name]()
                    continue
                raise CheckpointError(f"checkpoint {source} has no {name} state")
            try:
                state.load_state_dict(payload[name])
            except StateMismatch as exc:
                raise CheckpointError(f"checkpoint {source} {exc}") from exc
            except (ValueError, KeyError, RuntimeError) as exc:
                detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise CheckpointError(f"checkpoint {source}: its {name} state does not fit this run ({detail})") from exc

    def sweep_temp_files(self) -> None:
        """Remove what killed saves left behind (each as large as a checkpoint)."""
        if not self.dist.is_main:
            return
        leftovers = remove_temp_files(self.folder)
        if leftovers:
            log.info("removed %d temp file(s) of interrupted checkpoint saves in %s", len(leftovers), self.folder)

    def repair_best(self, resumed: Found) -> None:
        """Make best.pt hold the epoch that the resumed checkpoint names as its best."""
        if not self.dist.is_main:
            return
        best_epoch = int(train_state_of(resumed.payload)["best_epoch"])
        if best_epoch == 0:
            return
        held = self._epoch_in_best()
        if held == best_epoch:
            return
        source = self._end_of_epoch_checkpoint(best_epoch, resumed)
        what = "missing" if held is None else f"holding epoch {held}"
        if source is None:
            log.warning("best.pt is %s, but the run's best epoch is %d and no checkpoint of that epoch is left; "
                        "best.pt is kept as it is", what, best_epoch)
            return
        _copy_file(source, self.best)
        log.warning("best.pt was %s; restored epoch %d (the run's best) from %s", what, best_epoch, source.name)

    def _epoch_in_best(self) -> int | None:
        try:
            state = train_state_of(load_checkpoint(self.best))
        except CheckpointError:
            return None
        return int(state["epoch"]) if int(state["batch_in_epoch"]) == 0 else None

    def _end_of_epoch_checkpoint(self, epoch: int, resumed: Found) -> Path | None:
        state = train_state_of(resumed.payload)
        if int(state["epoch"]) == epoch and int(state["batch_in_epoch"]) == 0:
            return resumed.path
        numbered = self.folder / numbered_name(epoch)
        try:
            load_checkpoint(numbered)
        except CheckpointError:
            return None
        return numbered
