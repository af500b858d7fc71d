"""No data layout hangs training: a shard with an empty split part is left out of that split, a
split empty everywhere is an error naming the fix, and a damaged shard (a corrupted .idx of the
same size, token ids past the vocabulary) is an error naming the shard, on load or on read."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys

import numpy as np
import pytest
from test_data_prep_formats import tokenize, write_jsonl
from test_data_prep_support import ROOT, stdlib_docs

from data_prep.shard_index import HEADER_BYTES, ShardError
from mtp_dist.data import DataError, build_datasets

BYTE_VOCAB = 259


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (the bug this file guards against is an endless loop)."""

    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def build(out, split="98,1,1", num_samples=(16, 8, 8), **kw):
    with deadline(120):
        return build_datasets(
            [str(out)], None, split, 32, 2, 1, num_samples, BYTE_VOCAB, cache_dir=None, **kw
        )


@pytest.fixture()
def big_and_small(tmp_path):
    """`tokenize 'corpus/*.jsonl'` where one file is small: its shard's test part is empty."""
    docs = stdlib_docs(200)
    write_jsonl(tmp_path / "big.jsonl", docs[:170])
    write_jsonl(tmp_path / "small.jsonl", docs[170:])
    tokenize([tmp_path / "*.jsonl"], tmp_path / "out", tokenizer="byte")
    return tmp_path / "out"


def test_a_shard_with_an_empty_split_part_is_left_out_of_that_split(big_and_small):
    train, valid, test = build(big_and_small)
    # 30 documents: 98% -> [0, 29), 1% -> [29, 30), 1% -> nothing.
    assert len(train.inner.datasets) == 2 and len(valid.inner.datasets) == 2
    (only,) = [test.inner]  # one shard left: a plain GPTDataset, no blend
    assert only.dataset_path.endswith("shard-00000")
    for ds in (train, valid, test):
        assert ds[0]["tokens"].shape == (34,)


def test_a_split_part_empty_in_every_shard_is_an_error_only_when_needed(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", stdlib_docs(10))  # 1% of 10 documents: none
    tokenize([tmp_path / "a.jsonl"], tmp_path / "out", tokenizer="byte")
    train, valid, test = build(tmp_path / "out", num_samples=(16, 0, 0))
    assert len(train) > 0 and valid is None and test is None
    with pytest.raises(DataError, match=r"the valid part of data.split='98,1,1' has no documents"):
        build(tmp_path / "out", num_samples=(16, 8, 0))


def test_empty_shards_and_tiny_parts_build(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    write_jsonl(tmp_path / "one.jsonl", ["a single short document"])  # fewer tokens than a sample
    write_jsonl(tmp_path / "more.jsonl", stdlib_docs(3))
    tokenize([tmp_path / "*.jsonl"], tmp_path / "out", tokenizer="byte")
    train, _, _ = build(tmp_path / "out", split="1,0,0", num_samples=(16, 0, 0))
    assert len(train.inner.datasets) == 2  # the empty shard contributes to no split
    assert all(train[i]["tokens"].shape == (34,) for i in range(len(train)))


def _idx_arrays(prefix):
    """(sequence count, offsets of lengths, pointers, document indices) of a shard's .idx."""
    n = json.loads(open(prefix + ".json").read())["documents"]
    return n, HEADER_BYTES, HEADER_BYTES + 4 * n, HEADER_BYTES + 12 * n


def _corrupt(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize(
    "damage,message",
    [
        ("zero lengths", "sequence 0 has length 0"),
        ("swapped pointers", "sequence 1 starts at byte"),
        ("document indices", "document indices are not ordered"),
        ("header", "does not start with megatron-core's index header"),
        ("sequence count", "the .idx holds"),
    ],
)
def test_a_corrupted_idx_of_the_same_size_is_an_error_naming_the_shard(
    big_and_small, damage, message
):
    prefix = str(big_and_small / "shard-00001")
    n, lengths, pointers, docs = _idx_arrays(prefix)
    size = (big_and_small / "shard-00001.idx").stat().st_size
    idx = prefix + ".idx"
    if damage == "zero lengths":
        _corrupt(idx, lengths, bytes(4 * n))
    elif damage == "swapped pointers":
        p = np.fromfile(idx, dtype=np.int64, count=n, offset=pointers)
        _corrupt(idx, pointers, p[[0, 2, 1, *range(3, n)]].tobytes())
    elif damage == "document indices":
        _corrupt(idx, docs, np.arange(n + 1, 0, -1, dtype=np.int64).tobytes())
    elif damage == "header":
        _corrupt(idx, 0, b"NOTANIDX!")
    else:
        _corrupt(idx, 18, np.uint64(n + 5).tobytes())
    assert (big_and_small / "shard-00001.idx").stat().st_size == size
    with pytest.raises(ShardError) as info:
        build(big_and_small)
    assert f"shard {prefix}: " in str(info.value) and message in str(info.value)
    assert "python -m data_prep verify" in str(info.value)


def test_token_ids_past_the_vocabulary_are_an_error_where_they_are_read(big_and_small):
    prefix = big_and_small / "shard-00001"
    data = np.fromfile(f"{prefix}.bin", dtype=np.uint16)
    data[:] = 60000  # same size, same .idx: only reading the tokens shows it
    data.tofile(f"{prefix}.bin")
    train, _, _ = build(big_and_small)
    with pytest.raises(DataError, match=rf"shard {prefix}: sample \d+ holds token id 60000"):
        for i in range(len(train)):
            train[i]
    # The full check finds it too, from the command line.
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep", "verify", str(big_and_small)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "bad      shard-00001  sha256" in proc.stdout and "ok       shard-00000" in proc.stdout
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "1 of 2 shards are bad or missing (shard-00001)" in errors[0]


@pytest.mark.slow
def test_training_on_a_small_file_among_big_ones_does_not_hang(big_and_small, tmp_path):
    cmd = [
        sys.executable, "-m", "mtp_dist.train", "--config", "configs/tiny.yaml",
        "data.synthetic=false", f"data.paths=[{big_and_small}]", f"model.vocab_size={BYTE_VOCAB}",
        "train.steps=2", "train.eval_interval=1", "train.eval_steps=1", "logging.wandb=false",
        f"run.dir={tmp_path / 'run'}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _corrupt(str(big_and_small / "shard-00001.idx"), HEADER_BYTES, bytes(8))
    proc = subprocess.run(
        [*cmd, f"run.dir={tmp_path / 'run2'}"], cwd=ROOT, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "shard-00001: sequence 0 has length 0" in errors[0]
