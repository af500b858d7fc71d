"""The worker processes of tokenize: results come back, and the first failure (an error in a
worker, a worker's death) stops the others at once instead of letting queued work go on."""

from __future__ import annotations

import os
import signal
import time

import pytest

from data_prep.readers import BadInputFile
from data_prep.workers import WorkerDied, run_in_workers


def _work(job, progress):
    kind, value = job
    progress(1)
    if kind == "sleep":
        time.sleep(value)
    elif kind == "bad":
        raise BadInputFile(value, "corrupt file", "recreate it")
    elif kind == "bug":
        raise KeyError(value)
    elif kind == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    return (kind, value, os.getpid())


def test_results_and_progress_come_back_from_separate_processes():
    seen = []
    results = run_in_workers([("ok", i) for i in range(6)], _work, 3, seen.append)
    assert sorted(r[1] for r in results) == list(range(6)) and len(seen) == 6
    assert os.getpid() not in {r[2] for r in results}


def test_a_bad_file_stops_the_running_and_queued_workers():
    jobs = [("sleep", 30), ("bad", "x.jsonl"), *[("sleep", 30)] * 3]
    t0 = time.time()
    with pytest.raises(BadInputFile, match="x.jsonl: corrupt file"):
        run_in_workers(jobs, _work, 2, lambda *_: None)
    assert time.time() - t0 < 10  # the 30 s sleeper was terminated, the queued ones never ran


def test_a_dead_worker_is_named():
    with pytest.raises(WorkerDied, match=r"the worker for \('die', 7\) died \(killed by SIGKILL\)"):
        run_in_workers([("die", 7), ("sleep", 30)], _work, 2, lambda *_: None)


def test_a_bug_in_a_worker_keeps_the_workers_traceback():
    with pytest.raises(KeyError) as info:
        run_in_workers([("bug", "oops")], _work, 1, lambda *_: None)
    (note,) = info.value.__notes__
    assert "in the worker for ('bug', 'oops')" in note and "_work" in note
