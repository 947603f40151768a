"""What detr-train's inference commands (`detr-train-eval`, `detr-train-predict`) share:
logging to the terminal, one-line errors, and output folders that are never overwritten
unless asked."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path
from typing import Callable

from detr_train.errors import (
    ConfigError,
    DetrTrainError,
    exit_with_error,
    quiet_on_closed_pipe,
    take_verbose_flag,
    verbose,
)

LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


class OutputExistsError(DetrTrainError, FileExistsError):
    """The output folder holds earlier results."""


def run_command(program: str, parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], None],
                argv: list[str] | None = None) -> None:
    """Parse, run `body`, and turn expected errors into one line and exit status 2."""
    arguments = take_verbose_flag(list(sys.argv[1:] if argv is None else argv))
    with quiet_on_closed_pipe():
        args = parser.parse_args(arguments)
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
        try:
            body(args)
        except DetrTrainError as error:
            if verbose():
                raise
            exit_with_error(error, program=program)


def split_overrides(values: list[str]) -> tuple[list[str], list[str]]:
    """Positional arguments: `key=value` config overrides apart from paths."""
    overrides = [value for value in values if "=" in value and not Path(value).exists()]
    return [value for value in values if value not in overrides], overrides


def refuse_taken_output(path: Path, *, overwrite: bool, option: str = "--output") -> None:
    """Stop, before any work, when `path` exists and replacing it was not asked for."""
    if Path(path).exists() and not overwrite:
        raise OutputExistsError(f"output folder {path} already exists",
                                hint=f"choose another with {option}, or pass --overwrite to replace it")


def claim_output_dir(path: Path, *, overwrite: bool, option: str = "--output") -> Path:
    """`path`, empty and ready; an existing one only with `overwrite` (its contents are then replaced)."""
    path = Path(path)
    refuse_taken_output(path, overwrite=overwrite, option=option)
    if path.exists():
        if not path.is_dir():
            raise OutputExistsError(f"output path {path} exists and is not a folder")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def next_free_dir(base: Path) -> Path:
    """`base`, or `base_2`, `base_3`, ... : the first that does not exist (default outputs)."""
    if not base.exists():
        return base
    number = 2
    while base.with_name(f"{base.name}_{number}").exists():
        number += 1
    return base.with_name(f"{base.name}_{number}")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None,
                        help="auto, cpu, cuda or cuda:N (default: the run's training.device, else auto)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="a progress bar (default: when the terminal is interactive)")
    parser.add_argument("--verbose", action="store_true", help="tracebacks for expected errors too")


def add_slice_arguments(parser: argparse.ArgumentParser) -> None:
    """--slice, --slice-overlap, --slice-iou: the run's training.eval_slice* settings, changed."""
    parser.add_argument("--slice", type=int, default=None, metavar="N",
                        help="also run N x N tiles of each image at native resolution and merge their detections "
                             "with the whole image's (0: whole images only; default: the run's training.eval_slice)")
    parser.add_argument("--slice-overlap", type=float, default=None, metavar="F",
                        help="overlap of neighbouring tiles, a fraction of N in [0, 1) (default: the run's "
                             "training.eval_slice_overlap, 0.2)")
    parser.add_argument("--slice-iou", type=float, default=None, metavar="F",
                        help="IoU above which same-class detections from two views are one object (default: the "
                             "run's training.eval_slice_iou, 0.5)")


def slice_overrides(args: argparse.Namespace) -> list[str]:
    """The slice options as overrides of the run's config, checked under their own names."""
    overrides = []
    if args.slice is not None:
        if args.slice != 0 and args.slice < 32:
            raise ConfigError(f"--slice {args.slice}: must be at least 32 (pixels), or 0 for whole images only")
        overrides.append(f"training.eval_slice={args.slice or 'null'}")
    if args.slice_overlap is not None:
        if not 0 <= args.slice_overlap < 1:
            raise ConfigError(f"--slice-overlap {args.slice_overlap}: must be in [0, 1)")
        overrides.append(f"training.eval_slice_overlap={args.slice_overlap}")
    if args.slice_iou is not None:
        if not 0 < args.slice_iou <= 1:
            raise ConfigError(f"--slice-iou {args.slice_iou}: must be in (0, 1]")
        overrides.append(f"training.eval_slice_iou={args.slice_iou}")
    return overrides
