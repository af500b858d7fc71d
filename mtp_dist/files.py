"""Writing files so that no reader ever sees a half-written one, and locking a directory.

A file is written under a temporary name beside its target (`NAME.tmp.PID`), flushed to disk,
then renamed over the target, which is atomic on POSIX: a process killed at any moment leaves
either the old file or the new one. A failed write removes its temporary file.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mtp_dist.errors import UserError

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
    if not path.parent.is_dir():
        # Said here, by path: some writers (torch.save) report it as a RuntimeError.
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path.parent))
    tmp = tmp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # Some writers (safetensors) create private files: give the mode the umask says, as a
        # plain open would, so that a shared cluster's group can read what is exported.
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def umask() -> int:
    """This process's umask (read from /proc, without the set-and-restore race of os.umask)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_not_an_input(outputs, inputs, what: str, within: bool = False) -> None:
    """Refuse output paths that are among the command's inputs: no command writes over a file
    it reads (a symlink to one, or a hard link where the output exists, counts as the same).
    within: an input directory is read whole (a checkpoint): nothing may be written inside."""
    outputs = [outputs] if isinstance(outputs, (str, os.PathLike)) else list(outputs)
    given = {os.path.realpath(p): p for p in inputs}
    for out in outputs:
        real = os.path.realpath(out)
        same = given.get(real)
        if same is None and within:
            same = next((p for r, p in given.items() if real.startswith(r + os.sep)), None)
        if same is None and os.path.exists(out) and len(given) < 64:
            same = next((p for p in given.values() if _same_file(out, p)), None)
        if same is not None:
            raise UserError(
                f"{out} is what {what} reads ({same}): writing it would destroy its input; "
                "choose another output path"
            )


def _same_file(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def read_utf8(path: str | os.PathLike, what: str = "a file") -> str:
    """A text file's content; UserError naming it if it is not UTF-8 (its bytes' position)."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path} ({what}) is not UTF-8 text (byte {e.start}): give a UTF-8 file"
        ) from e


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


class DirectoryBusy(UserError, OSError):
    """Another process holds the directory's lock (its message names the holder)."""


class DirectoryLock:
    """An exclusive, non-blocking lock on a directory (flock on DIR/.lock, or DIR/`name`), held
    until release() or the process ends: the kernel drops it when the process dies, even by
    kill -9, so a stale lock never blocks a rerun. The holder's pid and command are written into
    the file for the message of whoever finds it taken."""

    def __init__(self, directory: str | os.PathLike, what: str, name: str = ".lock"):
        self.path = Path(directory) / name
        self.what = what
        self._file = None

    def acquire(self) -> DirectoryLock:
        import fcntl
        import sys

        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise DirectoryBusy(
                f"{self.path.parent} is in use by {holder}: two {self.what} cannot share it; "
                "wait for that one to finish or use another directory"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} ({' '.join(sys.argv)[:200]})\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def is_locked(path: str | os.PathLike) -> bool:
    """Whether another process holds the flock on the file `path` (a missing file is not
    locked; a free lock is taken for a moment and let go)."""
    import fcntl

    if not os.path.exists(path):
        return False
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False
