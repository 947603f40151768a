"""Optional TensorBoard logging of the per-epoch metrics.jsonl records and of images.

`tensorboard` is an optional extra: this module imports without it, and only building a
`TensorBoardWriter` needs it; then a missing package is one clear `MissingDependencyError`
that says what to install, instead of an ImportError from deep inside torch.

Tags are stable, derived from the record keys, so runs line up in the TensorBoard UI:

    train_loss, train_loss_ce, ...   -> train/loss, train/loss_ce, ...
    skipped_steps                    -> train/skipped_steps
    map, map_50, ..., mar_100, ...   -> val/map, val/map_50, ..., val/mar_100, ...
    map_per_class {name: ap}         -> map_per_class/<name>   (AP -1, no ground truth, is skipped)
    lr                               -> lr
    image_size                       -> data/image_size
    data_wait_fraction               -> time/data_wait_fraction
    epoch_time, eval_time            -> time/epoch_time, time/eval_time
    any other number                 -> its key, unchanged

`epoch` and `global_step` are the step axis, not scalars; lists (input_hw), strings,
bools, None and NaN/inf are skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from detr_train.reporting.records import record_numbers, scalar

log = logging.getLogger(__name__)

INSTALL_HINT = 'TensorBoard logging needs the tensorboard package: pip install -e ".[tensorboard]" (or pip install tensorboard)'

# Record keys that index the record rather than measure something.
STEP_KEYS = frozenset({"epoch", "global_step"})
# Keys whose tag is not given by the prefix rules in `scalar_tag`.
_FIXED_TAGS = {
    "lr": "lr",
    "skipped_steps": "train/skipped_steps",
    "image_size": "data/image_size",
    "data_wait_fraction": "time/data_wait_fraction",
}


class MissingDependencyError(RuntimeError):
    """An optional package that a requested feature needs is not installed."""


def _summary_writer_class():
    try:
        # torch.utils.tensorboard imports `tensorboard` itself, and raises ImportError
        # when it is missing or older than torch supports.
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise MissingDependencyError(INSTALL_HINT) from error
    return SummaryWriter


def scalar_tag(key: str) -> str:
    """The TensorBoard tag of a top-level record key (see the module docstring)."""
    if key in _FIXED_TAGS:
        return _FIXED_TAGS[key]
    if key.startswith("train_"):
        return "train/" + key[len("train_"):]
    if key.startswith(("map", "mar")):
        return "val/" + key
    if key.endswith("_time"):
        return "time/" + key
    return key


def record_scalars(record: Mapping[str, Any]) -> Iterator[tuple[str, float]]:
    """(tag, value) for every finite number of a metrics.jsonl record, nested dicts flattened."""
    for key, name, number in record_numbers(record, skip=STEP_KEYS):
        yield (scalar_tag(key) if name is None else f"{key}/{name}"), number


def _record_step(record: Mapping[str, Any]) -> int:
    for key in ("global_step", "epoch"):
        value = scalar(record.get(key))
        if value is not None:
            return int(value)
    raise ValueError("the record has neither global_step nor epoch: pass step=")


class TensorBoardWriter:
    """Writes metrics.jsonl records and images as TensorBoard events under `log_dir`."""

    def __init__(self, log_dir: Path, *, flush_secs: int = 30):
        summary_writer_class = _summary_writer_class()
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._writer = summary_writer_class(log_dir=str(self.log_dir), flush_secs=flush_secs)
        log.info("TensorBoard events in %s (view: tensorboard --logdir %s)", self.log_dir, self.log_dir)

    def log_record(self, record: Mapping[str, Any], step: int | None = None) -> int:
        """Every numeric scalar of `record` at `step` (default: its global_step, else its epoch).

        Returns how many scalars were written.
        """
        step = _record_step(record) if step is None else int(step)
        written = 0
        for tag, value in record_scalars(record):
            self._writer.add_scalar(tag, value, global_step=step)
            written += 1
        return written

    def log_images(self, tag: str, images: Sequence[torch.Tensor], step: int) -> None:
        """uint8 3xHxW images as `<tag>/<i>`; one event each, since their sizes may differ."""
        for index, image in enumerate(images):
            if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.dim() != 3:
                raise ValueError(f"{tag}/{index}: expected a uint8 CxHxW tensor")
            self._writer.add_image(f"{tag}/{index}", image.detach().cpu(), global_step=step, dataformats="CHW")

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
