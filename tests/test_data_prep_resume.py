"""Reruns: complete shards are skipped, partial ones redone; a run killed (SIGKILL) at any moment
and rerun gives output byte-identical to an uninterrupted run; SLURM tasks share a directory."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_data_prep_formats import decoded, tokenize, write_jsonl
from test_data_prep_support import ROOT, dir_bytes, spm_model, stdlib_docs

from data_prep.manifest import is_complete, load_manifest, read_sidecar
from data_prep.stdlib_corpus import write_stdlib_corpus
from mtp_dist.files import tmp_name


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    write_stdlib_corpus(str(out), max_mb=4, num_shards=8)
    return out


def _start(corpus: Path, out: Path, workers: int) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "data_prep",
        "tokenize",
        str(corpus / "*.jsonl"),
        "--output-dir",
        str(out),
        "--tokenizer",
        spm_model(),
        "--workers",
        str(workers),
        "--no-progress",
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    # Own session, so the kill reaches the workers too, as a SLURM cancel would.
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _kill_when(proc: subprocess.Popen, out: Path, ready, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        names = os.listdir(out) if out.exists() else []
        if ready(names):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            _wait_for_workers_to_end(out)
            return
        if proc.poll() is not None:
            pytest.fail(f"run finished before the kill point: {proc.stderr.read().decode()}")
        time.sleep(0.002)
    pytest.fail("kill point never reached")


def _wait_for_workers_to_end(out: Path, timeout: float = 30) -> None:
    """Workers hold the run's lock until they are gone, a moment after their parent."""
    deadline = time.time() + timeout
    with open(out / ".tokenize-task-0-of-1.lock", "a") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.time() > deadline:
                    pytest.fail("the killed run's workers still hold its lock")
                time.sleep(0.01)


@pytest.mark.slow
def test_sigkill_then_rerun_is_byte_identical(tmp_path, corpus):
    reference = tmp_path / "reference"
    tokenize([corpus / "*.jsonl"], reference, workers=1)

    out = tmp_path / "killed"
    # Killed when some shards are complete and others are being written (by two workers).
    proc = _start(corpus, out, 2)
    _kill_when(
        proc, out, lambda n: sum(x.startswith("shard-") and x.endswith(".json") for x in n) >= 2
    )
    complete = [is_complete(str(out), read_sidecar(str(out), f"shard-{i:05d}")) for i in range(8)]
    assert 2 <= sum(complete) < 8
    # The rerun (in-process: one interpreter start-up less) finishes the directory.
    summary = tokenize([corpus / "*.jsonl"], out, workers=2)
    assert summary["already_complete"] == sum(complete)
    assert dir_bytes(str(out)) == dir_bytes(str(reference))


def test_partial_shard_is_never_complete_and_is_redone(tmp_path):
    docs = stdlib_docs(6)
    write_jsonl(tmp_path / "a.jsonl", docs[:3])
    write_jsonl(tmp_path / "b.jsonl", docs[3:])
    out = tmp_path / "out"
    tokenize([tmp_path / "*.jsonl"], out)
    reference = dir_bytes(str(out))
    # Truncated data with its sidecar still there (e.g. a disk problem): not complete.
    with open(out / "shard-00001.bin", "r+b") as f:
        f.truncate(10)
    assert not is_complete(str(out), read_sidecar(str(out), "shard-00001"))
    # A renamed but unrecorded shard (killed before its sidecar): not complete.
    os.remove(out / "shard-00000.json")
    assert not is_complete(str(out), read_sidecar(str(out), "shard-00000"))
    (out / "shard-00000.bin.partial").write_bytes(b"junk")
    summary = tokenize([tmp_path / "*.jsonl"], out)
    assert summary["tokenized"] == 2 and summary["already_complete"] == 0
    assert dir_bytes(str(out)) == reference

    summary = tokenize([tmp_path / "*.jsonl"], out)
    assert summary["tokenized"] == 0 and summary["already_complete"] == 2


def test_killed_writers_temp_files_are_removed(tmp_path):
    """Temp files are named by mtp_dist.files (NAME.tmp.PID); a rerun finds a killed one's."""
    write_jsonl(tmp_path / "a.jsonl", stdlib_docs(2))
    out = tmp_path / "out"
    out.mkdir()
    stale = [out / tmp_name(out / "shard-00000.json").name, out / "manifest.json.tmp.1"]
    for path in stale:
        path.write_text("{half written")
    tokenize([tmp_path / "a.jsonl"], out)
    assert not any(p.exists() for p in stale)
    assert not [p for p in out.iterdir() if ".tmp." in p.name]


def test_rerun_with_other_tokenizer_is_refused(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", stdlib_docs(2))
    tokenize([tmp_path / "a.jsonl"], tmp_path / "out")
    with pytest.raises(ValueError, match="new output directory"):
        tokenize([tmp_path / "a.jsonl"], tmp_path / "out", tokenizer="byte")


def test_slurm_array_tasks_share_one_directory(tmp_path, monkeypatch):
    docs = stdlib_docs(10)
    for i in range(5):
        write_jsonl(tmp_path / f"in{i}.jsonl", docs[2 * i : 2 * i + 2])
    out = tmp_path / "out"
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    for task in ("1", "0"):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task)
        from data_prep.cli import main

        assert (
            main(
                [
                    "tokenize",
                    str(tmp_path / "in*.jsonl"),
                    "--output-dir",
                    str(out),
                    "--tokenizer",
                    spm_model(),
                    "--no-progress",
                ]
            )
            == 0
        )
        m = load_manifest(str(out))
        assert m["complete"] == (task == "0")
    assert [s["shard"] for s in m["shards"]] == [f"shard-{i:05d}" for i in range(5)]
    assert decoded(out) == docs
    reference = tmp_path / "single"
    tokenize([tmp_path / "in*.jsonl"], reference)
    assert dir_bytes(str(out)) == dir_bytes(str(reference))
