"""What a tokenize run as a whole does, from the command line: a run with no documents fails,
skipped bad files leave a complete (trainable) directory, Ctrl-C stops promptly and cleanly, and
one output directory takes one run per task at a time."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_data_prep_formats import decoded, tokenize, write_jsonl
from test_data_prep_support import (
    ROOT,
    dir_bytes,
    leftovers,
    spm_model,
    stdlib_docs,
    tokenize_args,
)

from data_prep.cli import main
from data_prep.manifest import is_complete, load_manifest, read_sidecar
from data_prep.stdlib_corpus import write_stdlib_corpus
from mtp_dist.files import is_locked


def run(capsys, *args) -> tuple[int, str, str]:
    code = main(list(map(str, args)))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "content",
    ["", "\n\n", '{"text": ""}\n{"text": "   "}\n'],
    ids=["empty-file", "blank-lines", "empty-texts"],
)
def test_a_run_without_documents_is_an_error(tmp_path, capsys, content):
    (tmp_path / "a.jsonl").write_text(content)
    code, _, err = run(capsys, *tokenize_args([tmp_path / "a.jsonl"], tmp_path / "out"))
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: no documents in any input of {tmp_path / 'out'}")
    assert "--text-field" in err


def test_jsonl_without_the_text_field_is_a_bad_file(tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", ["one", "two"], field="content")
    code, _, err = run(capsys, *tokenize_args([tmp_path / "a.jsonl"], tmp_path / "out"))
    assert code == 2 and len(err.splitlines()) == 1
    assert "a.jsonl: no record has the field 'text'" in err
    assert "(fields of the first record: ['content', 'id'])" in err
    assert "--text-field" in err and "--skip-bad-files" in err
    code, _, _ = run(capsys, *tokenize_args([tmp_path / "a.jsonl"], tmp_path / "out2", "byte",
                                            "--text-field", "content"))  # fmt: skip
    assert code == 0 and decoded(tmp_path / "out2", "byte") == ["one", "two"]


def test_an_empty_file_among_others_is_a_shard_of_no_documents(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text("")
    write_jsonl(tmp_path / "b.jsonl", ["text"])
    code, out, _ = run(capsys, *tokenize_args([tmp_path / "*.jsonl"], tmp_path / "out"))
    assert code == 0 and "directory complete: True" in out
    shards = load_manifest(str(tmp_path / "out"))["shards"]
    assert [s["documents"] for s in shards] == [0, 1]


def test_skipped_files_leave_a_complete_directory_that_trains(tmp_path, capsys):
    from mtp_dist.data import build_datasets

    docs = stdlib_docs(6)
    write_jsonl(tmp_path / "good.jsonl", docs)
    (tmp_path / "bad.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    args = tokenize_args([tmp_path / "*.jsonl*"], tmp_path / "out", "byte", "--skip-bad-files")
    code, out, _ = run(capsys, *args)
    assert code == 0 and "1 bad files skipped" in out and "directory complete: True" in out
    m = load_manifest(str(tmp_path / "out"))
    assert m["complete"] and m["totals"]["skipped_shards"] == 1
    train, _, _ = build_datasets([str(tmp_path / "out")], None, "100,0,0", 16, 2, 1, (4, 0, 0), 259)
    assert len(train) > 0 and train[0]["tokens"].shape == (18,)
    # A rerun tries the bad file again: still bad, still complete.
    code, out, _ = run(capsys, *args)
    assert code == 0 and "1 already complete" in out and "directory complete: True" in out
    # Fixed, it gets in.
    with gzip.open(tmp_path / "bad.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "repaired"}) + "\n")
    code, out, _ = run(capsys, *args)
    assert code == 0 and "0 bad files skipped" in out
    assert decoded(tmp_path / "out", "byte") == ["repaired", *docs]


def _start(corpus: Path, out: Path, tokenizer: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "data_prep", *tokenize_args([corpus / "*.jsonl"], out,
           tokenizer, *extra)]  # fmt: skip
    # Its own session: signals go to the run's whole process group, as a terminal's Ctrl-C does.
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(proc: subprocess.Popen, ready, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what}: {proc.stderr.read()[-2000:]}")
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


@pytest.mark.slow
def test_ctrl_c_stops_promptly_keeps_what_finished_and_reruns_cleanly(tmp_path):
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    write_stdlib_corpus(str(corpus), max_mb=4, num_shards=8)
    proc = _start(corpus, out, spm_model(), "--workers", "2")
    names = lambda: os.listdir(out) if out.exists() else []  # noqa: E731
    # Interrupted with shards both finished and in progress.
    _wait_for(
        proc,
        lambda: (
            any(n.endswith(".partial") for n in names())
            and any(n.startswith("shard-") and n.endswith(".json") for n in names())
        ),
        "a shard finished while others were in progress",
    )
    t0 = time.time()
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    elapsed = time.time() - t0
    assert proc.returncode == 130, stderr[-2000:]
    assert [ln for ln in stderr.splitlines() if ln.startswith("error:")] == ["error: interrupted"]
    assert elapsed < 10, f"took {elapsed:.1f} s to stop"
    assert leftovers(out) == []
    finished = [
        f"shard-{i:05d}"
        for i in range(8)
        if is_complete(str(out), read_sidecar(str(out), f"shard-{i:05d}"))
    ]  # noqa: E501
    m = load_manifest(str(out))
    assert 1 <= len(finished) < 8 and not m["complete"]
    assert sorted(s["shard"] for s in m["shards"]) == finished
    # Nothing left that a rerun must clean: the rerun completes, identical to an uninterrupted run.
    summary = tokenize([corpus / "*.jsonl"], out, workers=2)
    assert summary["already_complete"] == len(finished) and summary["directory_complete"]
    tokenize([corpus / "*.jsonl"], tmp_path / "reference")
    assert dir_bytes(str(out)) == dir_bytes(str(tmp_path / "reference"))


def _stopped_while_working(corpus: Path, out: Path, *extra: str) -> subprocess.Popen:
    """A run stopped (SIGSTOP) while it holds its task lock but not the manifest's."""
    task_lock = out / ".tokenize-task-{}-of-{}.lock".format(*extra[1::2])
    for _ in range(20):
        proc = _start(corpus, out, "byte", *extra)
        _wait_for(proc, lambda: is_locked(task_lock), "it took its lock")
        os.killpg(proc.pid, signal.SIGSTOP)
        if is_locked(task_lock) and not is_locked(out / ".manifest.lock"):
            return proc
        os.killpg(proc.pid, signal.SIGCONT)
        proc.communicate(timeout=120)
    pytest.fail("never caught the run between its locks")


def test_a_running_task_holds_its_lock(tmp_path, capsys):
    from data_prep.tokenize import task_lock

    write_jsonl(tmp_path / "a.jsonl", ["text"])
    args = tokenize_args([tmp_path / "a.jsonl"], tmp_path / "out")
    (tmp_path / "out").mkdir()
    with task_lock(str(tmp_path / "out"), 0, 1):  # as a run of task 0 of 1 would hold it
        code, _, err = run(capsys, *args)
        assert code == 2 and len(err.splitlines()) == 1
        assert f"{tmp_path / 'out'} is in use by pid {os.getpid()}" in err
        code, _, err = run(capsys, *args, "--task-index", "1", "--num-tasks", "2")
        assert code == 2 and "with --num-tasks 1" in err
    code, _, _ = run(capsys, *args)
    assert code == 0


@pytest.mark.slow
def test_one_run_per_task_and_one_split_of_the_inputs_at_a_time(tmp_path, capsys):
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    corpus.mkdir()
    for i in range(4):  # big enough that the run lasts (start-up alone is ~0.3 s)
        write_jsonl(corpus / f"{i}.jsonl", [f"document {i} " * 200_000])
    first = _stopped_while_working(corpus, out, "--task-index", "0", "--num-tasks", "2")
    try:
        args = tokenize_args([corpus / "*.jsonl"], out)
        code, _, err = run(capsys, *args, "--task-index", "0", "--num-tasks", "2")
        assert code == 2 and len(err.splitlines()) == 1
        assert f"is in use by pid {first.pid}" in err and "task 0 of 2" in err
        code, _, err = run(capsys, *args, "--task-index", "0", "--num-tasks", "3")
        assert code == 2 and "--num-tasks 2" in err and "same shards" in err
        code, _, err = run(capsys, *args)  # one task: all shards
        assert code == 2 and "--num-tasks 2" in err
        # The other task of the same array runs at the same time.
        code, out_text, _ = run(capsys, *args, "--task-index", "1", "--num-tasks", "2")
        assert code == 0 and "directory complete: False" in out_text
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr[-2000:]
    assert load_manifest(str(out))["complete"]
    # Once it is done, a run with another --num-tasks may go on in the directory.
    code, out_text, _ = run(capsys, *args)
    assert code == 0 and "4 already complete" in out_text
