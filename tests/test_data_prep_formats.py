"""Every input format round-trips: decoding the shards gives back the documents; and the
tokenizers behave (deterministic training, byte tokenizer, identity)."""

from __future__ import annotations

import gzip
import json
import os

import pytest
import zstandard
from test_data_prep_support import read_shard, spm_model, stdlib_docs

from data_prep.manifest import load_manifest
from data_prep.readers import ReadOptions
from data_prep.tokenize import TokenizeConfig, run_tokenize
from data_prep.tokenizers import ByteTokenizer, load_tokenizer


def tokenize(inputs, out_dir, tokenizer=None, **kw) -> dict:
    cfg = TokenizeConfig(
        inputs=[str(i) for i in inputs],
        out_dir=str(out_dir),
        tokenizer=tokenizer or spm_model(),
        progress=False,
        **kw,
    )
    return run_tokenize(cfg)


def decoded(out_dir, tokenizer=None) -> list[str]:
    """All documents of all shards of out_dir, in shard order, eod checked and stripped."""
    tok = load_tokenizer(tokenizer or spm_model())
    docs = []
    for shard in load_manifest(str(out_dir))["shards"]:
        if shard["status"] != "complete":
            continue
        for ids in read_shard(os.path.join(out_dir, shard["shard"])):
            assert ids[-1] == tok.eod_id and tok.eod_id not in ids[:-1]
            docs.append(tok.decode(ids[:-1].tolist()))
    return docs


def write_jsonl(path, docs, field="text", opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({field: d, "id": 1}) + "\n")


def test_jsonl_plain_gz_zst_round_trip(tmp_path):
    docs = stdlib_docs(30)
    write_jsonl(tmp_path / "a.jsonl", docs[:10])
    write_jsonl(tmp_path / "b.jsonl.gz", docs[10:20], opener=gzip.open)
    with open(tmp_path / "c.jsonl.zst", "wb") as raw:
        with zstandard.ZstdCompressor().stream_writer(raw) as w:
            w.write("".join(json.dumps({"text": d}) + "\n" for d in docs[20:]).encode())
    summary = tokenize([tmp_path / "*.jsonl*"], tmp_path / "out", workers=2)
    assert summary["tokenized"] == 3 and summary["documents"] == 30
    assert decoded(tmp_path / "out") == docs


@pytest.mark.parametrize("mode", ["file", "line", "block"])
def test_text_modes(tmp_path, mode):
    (tmp_path / "a.txt").write_text("first line\nsecond line\n\nthird para\n\n\nlast\n")
    (tmp_path / "b.txt").write_text("only one line")
    tokenize(
        [tmp_path / "a.txt", tmp_path / "b.txt"],
        tmp_path / "out",
        read_opts=ReadOptions(text_mode=mode),
    )
    expected = {
        "file": ["first line\nsecond line\n\nthird para\n\n\nlast\n", "only one line"],
        "line": ["first line", "second line", "third para", "last", "only one line"],
        "block": ["first line\nsecond line", "third para", "last", "only one line"],
    }[mode]
    assert decoded(tmp_path / "out") == expected


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = stdlib_docs(12)
    pq.write_table(
        pa.table({"content": docs, "n": list(range(12))}), tmp_path / "d.parquet", row_group_size=5
    )
    tokenize(
        [tmp_path / "d.parquet"], tmp_path / "out", read_opts=ReadOptions(text_field="content")
    )
    assert decoded(tmp_path / "out") == docs


def test_hf_saved_to_disk_and_local_files(tmp_path):
    import datasets

    docs = stdlib_docs(12)
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "saved"))
    tokenize([tmp_path / "saved"], tmp_path / "out1", hf_num_shards=3)
    assert len(load_manifest(str(tmp_path / "out1"))["shards"]) == 3
    assert decoded(tmp_path / "out1") == docs

    (tmp_path / "local").mkdir()
    write_jsonl(tmp_path / "local" / "part.jsonl", docs)
    tokenize([tmp_path / "local"], tmp_path / "out2", fmt="hf")
    assert decoded(tmp_path / "out2") == docs


def test_byte_tokenizer_round_trip(tmp_path):
    docs = ["héllo wörld ✓", "plain ascii", "emoji 🐍"]
    write_jsonl(tmp_path / "a.jsonl", docs)
    tokenize([tmp_path / "a.jsonl"], tmp_path / "out", tokenizer="byte")
    assert decoded(tmp_path / "out", "byte") == docs
    tok = ByteTokenizer()
    assert tok.vocab_size == 259 and len({tok.eod_id, tok.pad_id, tok.bos_id}) == 3
    flat, lengths = tok.encode_flat(docs)
    assert lengths.tolist() == [len(d.encode()) for d in docs] and flat.max() < 256


def test_manifest_records_shards_and_tokenizer(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", stdlib_docs(5))
    tokenize([tmp_path / "a.jsonl"], tmp_path / "out")
    m = load_manifest(str(tmp_path / "out"))
    tok = load_tokenizer(spm_model())
    assert m["complete"] and m["tokenizer"] == tok.identity
    (shard,) = m["shards"]
    assert shard["documents"] == 5 and shard["input"]["paths"] == [str(tmp_path / "a.jsonl")]
    assert shard["tokens"] == sum(
        len(ids) for ids in read_shard(str(tmp_path / "out" / "shard-00000"))
    )
    assert len(shard["sha256"]) == 64 and shard["skipped_documents"] == {}


def test_sentencepiece_training_is_deterministic(tmp_path):
    from data_prep.tokenizers import SentencePieceOptions, train_sentencepiece

    lines = [ln for d in stdlib_docs(60) for ln in d.split("\n") if ln.strip()]
    opts = SentencePieceOptions(vocab_size=450, seed=7, input_sentence_size=2000)
    a = train_sentencepiece(iter(lines), str(tmp_path / "a"), opts)
    b = train_sentencepiece(iter(lines), str(tmp_path / "b"), opts)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert a.identity == b.identity and a.vocab_size == 450
    assert (a.eod_id, a.pad_id) == (2, 3)
    text = "def f(x):\n\treturn x  ** 12345  # ünïcode ✓\n"
    assert a.decode(a.encode_batch([text])[0].tolist()) == text  # byte fallback, no normalising
