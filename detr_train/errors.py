"""Expected errors, and how the command line reports them.

An expected error is the user's to fix: a bad config value, a dataset that cannot be
read, a checkpoint that does not fit, a device that is not there, pretrained weights that
cannot be fetched, a search space that does not parse. Each is a `DetrTrainError` whose
message names the key, file or value at fault. The CLI prints it as one line,

    detr-train: error: <message>
      hint: <what to do>            (only when there is a hint)

and exits with status 2, without a traceback. `--verbose` or HYDRA_FULL_ERROR=1 show the
traceback too. Anything else is a bug and keeps its traceback.

Imports nothing heavy: the CLI uses it before torch is loaded.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys

PROGRAM = "detr-train"
EXIT_USAGE = 2
VERBOSE_FLAG = "--verbose"
_VERBOSE_ENV = "DETR_TRAIN_VERBOSE"


class DetrTrainError(Exception):
    """An error the user can fix; `hint` says how, where that helps."""

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class ConfigError(DetrTrainError, ValueError):
    """A config value that composes but cannot be used (out of range, contradicts another key)."""


class ExportError(DetrTrainError, RuntimeError):
    """A model that cannot be exported, or an exported ONNX graph that disagrees with PyTorch."""


def verbose() -> bool:
    """Whether the user asked for tracebacks of expected errors too."""
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes") for name in ("HYDRA_FULL_ERROR", _VERBOSE_ENV))


def take_verbose_flag(argv: list[str]) -> list[str]:
    """`argv` without `--verbose` (Hydra's parser would refuse it); remembers the flag for
    this process and its children (launcher workers)."""
    if VERBOSE_FLAG not in argv:
        return argv
    os.environ[_VERBOSE_ENV] = "1"
    return [arg for arg in argv if arg != VERBOSE_FLAG]


def one_line(message: str) -> str:
    return " ".join(str(message).split())


def own_message(error: BaseException | str) -> str:
    """The error's own message. An exception raised in a DataLoader worker reaches the main
    process re-raised by torch with the worker's whole traceback as its message ("Caught X in
    DataLoader worker process N. Original Traceback ..."): that is cut back to what the
    original exception said."""
    text = str(error)
    if isinstance(error, str) or not text.startswith("Caught ") or "\nOriginal Traceback" not in text:
        return text
    # The traceback ends with "<module>.<ExceptionName>: <message>", the message perhaps on several lines.
    ends = list(re.finditer(rf"^(?:[\w.]+\.)?{re.escape(type(error).__name__)}: ", text, flags=re.MULTILINE))
    return text[ends[-1].end():].strip() if ends else text


def format_error(error: BaseException | str, hint: str | None = None, *, program: str = PROGRAM) -> str:
    text = f"{program}: error: {one_line(own_message(error))}"
    hint = hint if hint is not None else getattr(error, "hint", None)
    if hint:
        text += f"\n  hint: {one_line(hint)}"
    return text


@contextlib.contextmanager
def quiet_on_closed_pipe():
    """End quietly when the reader of our output goes away (`detr-train --help | head`)."""
    try:
        yield
    except BrokenPipeError:
        # Python would print a traceback at exit while flushing the dead pipe: point stdout at
        # /dev/null first, as the Python docs advise for SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0) from None


def exit_with_error(error: BaseException | str, hint: str | None = None, *, program: str = PROGRAM) -> None:
    """Print the error the CLI way and exit with status 2 (SystemExit passes through Hydra)."""
    print(format_error(error, hint, program=program), file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USAGE)
