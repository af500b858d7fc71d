"""One error contract for every command (train, export, report, data_prep, the converters):

- an anticipated failure (bad input, a config mistake, an OS error) is one line on stderr,
  `error: ...`, naming the input and the fix, and exit status 2, with no traceback;
- Ctrl-C is `error: interrupted`, exit status 130;
- a closed stdout (`| head`) ends the command quietly, as it ends a Unix tool: exit status 141
  (128 + SIGPIPE), nothing printed;
- anything else is a bug: its traceback, then a line that says so, and exit status 1.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
import traceback
from collections.abc import Callable

EXIT_USAGE = 2
EXIT_BUG = 1
EXIT_INTERRUPTED = 130
EXIT_PIPE = 141


class UserError(Exception):
    """An anticipated failure whose message names the input and the fix (the base of
    ConfigError, CheckpointError, BadInputFile ...)."""


def number(above: float, at_most: float | None = None, integer: bool = False):
    """An argparse type: a finite number > `above` (and <= `at_most`), so that the error names
    the flag the user gave (argparse adds it) and no inf, nan or out-of-range value passes."""
    import math

    def parse(text: str):
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value <= above or (at_most is not None and value > at_most):
            upper = f" and <= {at_most:g}" if at_most is not None else ""
            raise argparse.ArgumentTypeError(f"{text} must be a finite number > {above:g}{upper}")
        return value

    parse.__name__ = "number"
    return parse


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


def underlying(e: BaseException) -> BaseException:
    """The exception behind a wrapper: torch's CheckpointException (a BaseException holding
    each failed rank's exception and traceback; matched by its shape, torch is not imported
    here) gives its first rank's."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        cause = first[0] if isinstance(first, tuple) else first
        if isinstance(cause, BaseException):
            return underlying(cause)
    return e


def stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll reports an error on its end)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no stdout, or not a file descriptor
        return False


class StdoutLogHandler(logging.StreamHandler):
    """Log lines on stdout; once its reader has gone (`| head`), further lines are dropped
    quietly and the command goes on (a training keeps its checkpoints and metrics on disk),
    instead of a "Logging error" traceback per line."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], BrokenPipeError) and stdout_closed():
            return
        super().handleError(record)


def _end_quietly() -> int:
    """A closed stdout: point it at /dev/null, so that the interpreter's final flush does not
    raise again at exit, and end as SIGPIPE ends a Unix tool."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
    return EXIT_PIPE


def run_cli(main: Callable[[], int]) -> int:
    """Run a command's main() under the contract above; returns its exit status."""
    try:
        status = main()
        sys.stdout.flush()  # here, not at exit: a closed stdout is then handled as one
        return status
    except BaseException as e:
        return _exit_status(e)


def _exit_status(e: BaseException) -> int:
    if isinstance(e, SystemExit):  # argparse's --help or usage error: its own exit status
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            if stdout_closed():
                return _end_quietly()
        raise e
    cause = underlying(e)
    if isinstance(cause, BrokenPipeError) and stdout_closed():
        return _end_quietly()
    if isinstance(cause, (UserError, OSError)):
        if isinstance(cause, OSError) and not isinstance(cause, UserError):
            if cause.filename is None:
                # No path to name (a pipe, a socket): the line alone cannot say where it happened.
                traceback.print_exception(e)
        print(f"error: {one_line(cause)}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(e, KeyboardInterrupt):
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not isinstance(e, Exception) and cause is e:
        raise e  # GeneratorExit and the like: not the command's failure to report
    traceback.print_exception(e)
    print(
        "error: this is a bug in mtp-dist (an unexpected exception, traceback above): "
        "please report it with the command and the traceback",
        file=sys.stderr,
    )
    return EXIT_BUG
