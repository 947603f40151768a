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

from detr_train.errors import DetrTrainError, exit_with_error, quiet_on_closed_pipe, take_verbose_flag, verbose

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
