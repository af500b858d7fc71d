"""A rank that makes no progress says where it is stuck and exits, instead of hanging a job.

The owner calls `progress(phase)` at every milestone (process group up, datasets built, each
step, each checkpoint); if none comes for `timeout` seconds, a daemon thread prints the phase
the rank is stuck in and every thread's stack (faulthandler), then ends the process with status
4. A thread is enough even when the main thread waits in a collective: gloo and NCCL waits
release the GIL.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time

EXIT_STUCK = 4


class Watchdog:
    def __init__(self, timeout: float, rank: int):
        self.timeout = timeout
        self.rank = rank
        self.phase = "start-up"
        self.last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Watchdog:
        if self.timeout > 0:
            self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
            self._thread.start()
        return self

    def progress(self, phase: str) -> None:
        self.phase = phase
        self.last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, self.timeout / 4)):
            idle = time.monotonic() - self.last
            if idle > self.timeout:
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        sys.stderr.write(
            f"watchdog: rank {self.rank} made no progress for {idle:.0f} s, stuck in: "
            f"{self.phase} (train.watchdog_seconds={self.timeout:g}); stacks of its threads:\n"
        )
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(EXIT_STUCK)
