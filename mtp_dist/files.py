"""Writing files so that no reader ever sees a half-written one, and locking a directory.

A file is written under a temporary name beside its target (`NAME.tmp.PID`), flushed to disk,
then renamed over the target, which is atomic on POSIX: a process killed at any moment leaves
either the old file or the new one. A failed write removes its temporary file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_INFIX = ".tmp."
"""Temporary files are NAME.tmp.PID; a glob of NAME.tmp.* finds a killed writer's leftovers."""


def tmp_name(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(f"{path.name}{TMP_INFIX}{os.getpid()}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new content to (any writer: open, torch.save,
    np.save ...); on success it is synced and renamed over `path`, on error removed."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    """JSON with sorted keys and a final newline: the same object gives the same bytes."""
    atomic_write(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename inside `directory` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
