"""Durable file writes: every file the project writes goes through here.

A reader (a resumed run, a notebook polling `trials.csv`, a second sweeper) sees either
the old file or the new one, never half of one, and a crash at any moment leaves one of
the two on disk:

- `atomic_write` writes a temp file in the same folder, flushes and fsyncs it, renames it
  over the target (`os.replace` is atomic within a file system), then fsyncs the folder
  so that the rename itself survives a power cut;
- `append_durably` appends one record and fsyncs, for logs that only grow.

Temp files are named `.<name>.<random>.tmp`; a run sweeps those of a killed write with
`remove_temp_files` before it writes again.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Union

Content = Union[bytes, str, Callable[[BinaryIO], None]]

TEMP_SUFFIX = ".tmp"
# Files are created 0600 by mkstemp; written files should read like any other output.
_FILE_MODE = 0o666


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(folder: Path) -> None:
    """Make renames and creations inside `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, content: Content, *, executable: bool = False) -> Path:
    """Replace `path` with `content` (bytes, text, or a function that writes to a binary handle)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            if callable(content):
                content(handle)
            else:
                handle.write(content.encode() if isinstance(content, str) else content)
            handle.flush()
            os.fsync(handle.fileno())
        mode = (_FILE_MODE | (0o111 if executable else 0)) & ~_umask()
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def append_durably(path: Path, text: str) -> None:
    """Append `text` to `path` and fsync, so an appended record survives a crash right after."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def remove_temp_files(folder: Path) -> list[Path]:
    """Delete the temp files that killed `atomic_write`s left in `folder`; returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    leftovers = [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX) and p.is_file()]
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)
    return leftovers
