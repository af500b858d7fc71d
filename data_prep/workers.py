"""Running shard jobs in worker processes: one forked process per job, at most N at a time.

A process per job rather than a pool: the parent can stop every worker at once at any moment
(Ctrl-C, a bad file, a dead worker) with Process.terminate, which concurrent.futures cannot do
before Python 3.14, so a failed or interrupted run never goes on with queued jobs. Forking costs
milliseconds, and a job (one output shard) takes seconds to hours.

Each worker reports over its own pipe: ("progress", increments)*, then ("result", value) or
("error", exception, traceback). A worker that ends without either died (killed, out of memory).
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import pickle
import signal
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait

from mtp_dist.errors import UserError


class WorkerDied(UserError):
    """A worker process ended without a result."""


def run_in_workers(
    jobs: Sequence,
    work: Callable,
    workers: int,
    progress: Callable[..., None],
    describe: Callable[[object], str] = str,
) -> list:
    """[work(job, progress) for job in jobs], run in up to `workers` forked processes; results
    in the order the jobs finish. The first failure (an exception in a worker, a worker's death,
    KeyboardInterrupt in the parent) terminates the running workers, starts no more, and is
    raised. Fork: workers inherit what the parent imported and loaded (the tokenizer) instead
    of loading it each."""
    ctx = mp.get_context("fork")
    queue = list(jobs)
    running: dict = {}  # receiving end of a worker's pipe -> (process, job)
    ended = []  # workers that sent their result, reaped once the next ones have started
    results = []
    interrupted = _InterruptFlag()
    try:
        while queue or running:
            interrupted.check()
            while queue and len(running) < workers:
                job = queue.pop(0)
                receive, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_worker_main, args=(work, job, send), daemon=True)
                proc.start()
                send.close()  # the worker holds the only writing end: EOF when it ends
                running[receive] = (proc, job)
            while ended:
                ended.pop().join()
            for conn in wait(list(running), timeout=0.1):  # the timeout: to see Ctrl-C
                proc, job = running[conn]
                try:
                    message = conn.recv()
                except EOFError:
                    proc.join()
                    raise WorkerDied(
                        f"the worker for {describe(job)} died ({_exit_reason(proc.exitcode)}): "
                        "rerun to redo it (with fewer --workers if memory is short)"
                    ) from None
                if message[0] == "progress":
                    progress(*message[1])
                    continue
                del running[conn]
                conn.close()
                ended.append(proc)
                if message[0] == "error":
                    _, err, trace = message
                    if not isinstance(err, (UserError, OSError)):
                        err.add_note(f"in the worker for {describe(job)}:\n{trace}")
                    raise err
                results.append(message[1])
    except BaseException:
        for proc, _ in running.values():
            proc.terminate()
        for proc, _ in running.values():
            proc.join()
        raise
    finally:
        for proc in ended:
            proc.join()
        interrupted.restore()
    return results


class _InterruptFlag:
    """Ctrl-C as a flag that the loop checks, instead of a KeyboardInterrupt raised wherever the
    parent happens to be: raised inside fork's own handlers, it is printed and lost, and the run
    would go on. Workers forked meanwhile inherit this harmless handler, not the raising one."""

    def __init__(self) -> None:
        self.set = False
        self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        self.set = True

    def check(self) -> None:
        if self.set:
            raise KeyboardInterrupt

    def restore(self) -> None:
        signal.signal(signal.SIGINT, self.previous)


def _worker_main(work: Callable, job, conn) -> None:
    # Ctrl-C reaches the whole process group; the parent alone decides what happens.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    try:
        result = work(job, lambda *inc: conn.send(("progress", inc)))
        conn.send(("result", result))
    except BaseException as e:
        conn.send(("error", _transportable(e), traceback.format_exc()))
    finally:
        conn.close()


def _transportable(e: BaseException) -> BaseException:
    """`e` if it survives pickling (which the pipe does), else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


def _die_with_parent() -> None:
    """A killed run (kill -9, a SLURM cancel) must not leave workers writing its output dir."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"
