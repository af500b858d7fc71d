"""`python -m data_prep verify DIR`: every shard against the manifest, one line each, exit 2 if
any is bad or missing; and the .idx reader it shares with training agrees with megatron-core."""

from __future__ import annotations

import numpy as np
from test_data_prep_formats import tokenize, write_jsonl
from test_data_prep_support import read_shard, run_cli, stdlib_docs

from data_prep.manifest import load_manifest
from data_prep.shard_index import check_index, open_index


def verify(out):
    proc = run_cli("verify", str(out))
    rows = {ln.split()[1]: ln.split()[0] for ln in proc.stdout.splitlines()[:-1]}
    return proc, rows


def test_a_sound_directory_verifies(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", stdlib_docs(5))
    (tmp_path / "b.jsonl").write_text("")  # a shard without documents is sound too
    (tmp_path / "c.jsonl.gz").write_bytes(b"not gzip")
    tokenize([tmp_path / "*.jsonl*"], tmp_path / "out", skip_bad_files=True)
    proc, rows = verify(tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert rows == {"shard-00000": "ok", "shard-00001": "ok", "shard-00002": "skipped"}
    assert proc.stdout.splitlines()[-1].endswith("2 ok, 1 skipped") and proc.stderr == ""


def test_changed_and_missing_shards_are_reported(tmp_path):
    for i in range(3):
        write_jsonl(tmp_path / f"{i}.jsonl", stdlib_docs(9)[3 * i : 3 * i + 3])
    tokenize([tmp_path / "*.jsonl"], tmp_path / "out")
    idx = tmp_path / "out" / "shard-00002.idx"
    data = bytearray(idx.read_bytes())
    data[-8:] = bytes(8)  # the last document index: same size, other content
    idx.write_bytes(bytes(data))
    (tmp_path / "out" / "shard-00001.bin").unlink()
    proc, rows = verify(tmp_path / "out")
    assert proc.returncode == 2
    assert rows == {"shard-00000": "ok", "shard-00001": "bad", "shard-00002": "bad"}
    assert "shard-00001.bin is missing" in proc.stdout and "sha256" in proc.stdout
    (error,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert "2 of 3 shards are bad or missing (shard-00001, shard-00002)" in error
    assert "remove the bad shards' .json files and rerun" in error


def test_an_unfinished_directory_has_missing_shards(tmp_path):
    for i in range(2):
        write_jsonl(tmp_path / f"{i}.jsonl", [f"document {i}"])
    tokenize([tmp_path / "*.jsonl"], tmp_path / "out", task_index=1, num_tasks=2)
    proc, rows = verify(tmp_path / "out")
    assert proc.returncode == 2 and rows == {"shard-00000": "missing", "shard-00001": "ok"}


def test_the_index_reader_agrees_with_megatron_core(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    write_jsonl(tmp_path / "a.jsonl", stdlib_docs(7))
    tokenize([tmp_path / "a.jsonl"], tmp_path / "out")
    prefix = str(tmp_path / "out" / "shard-00000")
    sidecar = load_manifest(str(tmp_path / "out"))["shards"][0]
    ours = open_index(prefix, sidecar)
    check_index(ours)
    theirs = IndexedDataset(prefix)
    assert ours.dtype == theirs.index.dtype and ours.sequences == len(theirs)
    assert np.array_equal(ours.lengths, theirs.sequence_lengths)
    assert np.array_equal(ours.pointers, theirs.index.sequence_pointers)
    assert np.array_equal(ours.document_indices, theirs.document_indices)
    docs = read_shard(prefix)
    assert ours.tokens_between(2, 5) == sum(len(d) for d in docs[2:5])
    assert ours.tokens_between(0, 7) == sidecar["tokens"] and ours.tokens_between(3, 3) == 0
