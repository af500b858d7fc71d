"""data_prep writes megatron-core's .bin/.idx format itself (data_prep.shard_index.ShardWriter):
the same bytes as megatron-core's own writer, read back by megatron-core's reader; and no
data_prep command imports torch or megatron-core, whose import was most of a run's start-up."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from test_data_prep_formats import write_jsonl
from test_data_prep_support import ROOT, read_shard, stdlib_docs

from data_prep.shard_index import ShardWriter

HEAVY = {"torch", "megatron", "deepspeed", "transformers", "datasets", "pyarrow"}


def documents(dtype, vocab: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab, size=n).astype(dtype) for n in (5, 1, 17, 3, 1, 4000)]


@pytest.mark.parametrize(
    ("dtype", "vocab", "batches"),
    [(np.uint16, 65535, [2, 4]), (np.int32, 200_000, [6]), (np.uint16, 400, [])],
    ids=["uint16-two-batches", "int32-one-batch", "no-documents"],
)
def test_the_writer_gives_megatron_cores_bytes(tmp_path, dtype, vocab, batches):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    docs = documents(dtype, vocab)[: sum(batches)]
    theirs = IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=dtype)
    for d in docs:
        theirs.add_document(d, [d.size])
    theirs.finalize(str(tmp_path / "theirs.idx"))

    ours = ShardWriter(str(tmp_path / "ours.bin"), dtype)
    start = 0
    for size in batches:
        batch = docs[start : start + size]
        ours.add_documents(np.concatenate(batch), np.array([d.size for d in batch]))
        start += size
    ours.finalize(str(tmp_path / "ours.idx"))

    for ext in ("bin", "idx"):
        assert (tmp_path / f"ours.{ext}").read_bytes() == (tmp_path / f"theirs.{ext}").read_bytes()
    if not docs:
        return  # megatron-core's reader cannot map an empty .bin; the bytes above are its own
    back = read_shard(str(tmp_path / "ours"))
    assert len(back) == len(docs)
    for got, want in zip(back, docs, strict=True):
        assert got.dtype == want.dtype and np.array_equal(got, want)


def test_the_writer_refuses_lengths_that_do_not_add_up(tmp_path):
    writer = ShardWriter(str(tmp_path / "a.bin"), np.uint16)
    with pytest.raises(ValueError, match="add up to 5, not 4"):
        writer.add_documents(np.zeros(4, np.uint16), np.array([2, 3]))
    writer.close()


_RUN_COMMANDS = """
import json, sys
from data_prep.cli import main

for argv in json.loads(sys.argv[1]):
    try:
        status = main(argv)
    except SystemExit as e:  # --help
        status = e.code
    if status != 0:
        sys.exit(f"{argv} exited {status}")
print(json.dumps(sorted({name.partition(".")[0] for name in sys.modules})))
"""


def test_no_data_prep_command_imports_torch_or_megatron_core(tmp_path):
    """Every command, run for real in one fresh interpreter, lazy imports included."""
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", stdlib_docs(6))
    write_jsonl(corpus / "b.jsonl", stdlib_docs(9)[6:])
    commands = [
        ["--help"],
        ["stdlib-corpus", str(tmp_path / "stdlib"), "--max-mb", "0.05", "--num-shards", "1"],
        ["induction-corpus", str(tmp_path / "induction"), "--max-mb", "0.05", "--heldout-mb",
         "0.05"],
        ["induction-copy", str(tmp_path / "induction"), str(tmp_path / "copy"), "--docs", "5"],
        ["train-tokenizer", str(corpus / "*.jsonl"), "--output", str(tmp_path / "tok"),
         "--vocab-size", "400"],
        ["tokenize", str(corpus / "*.jsonl"), "--output-dir", str(out), "--tokenizer",
         str(tmp_path / "tok.model"), "--workers", "2", "--no-progress"],
        ["manifest", str(out)],
        ["verify", str(out)],
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", _RUN_COMMANDS, json.dumps(commands)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    imported = set(json.loads(proc.stdout.splitlines()[-1]))
    assert {"data_prep", "numpy", "sentencepiece"} <= imported  # the commands did run
    assert not imported & HEAVY, f"data_prep imported {sorted(imported & HEAVY)}"
