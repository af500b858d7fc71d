"""One error contract for every command (train, export, report, data_prep, the converters):

- an anticipated failure (bad input, a config mistake, an OS error) is one line on stderr,
  `error: ...`, naming the input and the fix, and exit status 2, with no traceback;
- Ctrl-C is `error: interrupted`, exit status 130;
- anything else is a bug: its traceback, then a line that says so, and exit status 1.
"""

from __future__ import annotations

import errno
import sys
import traceback
from collections.abc import Callable

EXIT_USAGE = 2
EXIT_BUG = 1
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """An anticipated failure whose message names the input and the fix (the base of
    ConfigError, CheckpointError, BadInputFile ...)."""


_OS_FIXES = {
    errno.ENOSPC: "free disk space or write elsewhere",
    errno.EDQUOT: "free disk space or write elsewhere",
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.EROFS: "the file system is read-only: choose another path",
    errno.ENOENT: "check the path (and that its parent directory exists)",
    errno.EISDIR: "it is a directory: give a file",
    errno.ENOTDIR: "a part of the path is a file, not a directory: fix the path",
    errno.EEXIST: "it already exists: remove it or choose another path",
}


def describe_os_error(e: OSError) -> str:
    """`PATH: what went wrong: the fix` for an OSError."""
    where = e.filename if e.filename is not None else "a file"
    if e.filename2 is not None:
        where = f"{where} -> {e.filename2}"
    what = e.strerror or str(e)
    fix = _OS_FIXES.get(e.errno, "check the path")
    return f"{where}: {what}: {fix}"


def one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        text = describe_os_error(e)
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


def run_cli(main: Callable[[], int]) -> int:
    """Run a command's main() under the contract above; returns its exit status."""
    try:
        return main()
    except (UserError, OSError) as e:
        if isinstance(e, OSError) and not isinstance(e, UserError) and e.filename is None:
            # No path to name (a pipe, a socket): the line alone cannot say where it happened.
            traceback.print_exc()
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:
        traceback.print_exc()
        print(
            "error: this is a bug in mtp-dist (an unexpected exception, traceback above): "
            "please report it with the command and the traceback",
            file=sys.stderr,
        )
        return EXIT_BUG
