"""train-tokenizer gives the same model in every process for the same inputs and seed, also when
it trains on a sample of the lines (sentencepiece's own sampler is not seeded)."""

from __future__ import annotations

import collections

from test_data_prep_formats import write_jsonl
from test_data_prep_support import run_cli, stdlib_docs

from data_prep.tokenizers import sample_sentences


def test_train_tokenizer_is_reproducible_across_processes(tmp_path):
    docs = stdlib_docs(80)
    write_jsonl(tmp_path / "a.jsonl", docs[:40])
    write_jsonl(tmp_path / "b.jsonl", docs[40:])
    lines = sum(1 for d in docs for ln in d.split("\n") if ln.strip())

    def train(name: str, seed: str) -> bytes:
        proc = run_cli("train-tokenizer", str(tmp_path / "*.jsonl"), "--output",
                       str(tmp_path / name), "--vocab-size", "500", "--seed", seed,
                       "--input-sentence-size", str(lines // 3))  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        return (tmp_path / f"{name}.model").read_bytes()

    first = train("first", "0")
    assert train("second", "0") == first
    assert train("other_seed", "1") != first  # the sample decides the model: the test can fail


def test_sample_sentences_is_seeded_and_uniform():
    items = [f"line {i}" for i in range(10_000)]
    a = sample_sentences(iter(items), 500, seed=3)
    assert a == sample_sentences(iter(items), 500, seed=3) != sample_sentences(items, 500, 4)
    assert len(a) == len(set(a)) == 500 and set(a) <= set(items)
    assert sample_sentences(items[:10], 500, seed=3) == items[:10]
    # Uniform: every tenth of the input holds about a tenth of the sample.
    tenths = collections.Counter(int(s.split()[1]) // 1000 for s in a)
    assert all(30 <= tenths[t] <= 70 for t in range(10)), tenths
