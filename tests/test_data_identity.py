"""A checkpoint does not resume on shards of another tokenizer, also when data.tokenizer is not
set: preflight takes the tokenizer's identity from the shards' manifests (data_identity)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from test_data_prep_formats import tokenize, write_jsonl
from test_data_prep_support import ROOT, stdlib_docs

from data_prep.manifest import load_manifest
from data_prep.tokenizers import SentencePieceOptions, train_sentencepiece

pytestmark = pytest.mark.slow  # two training processes

VOCAB = 512


def train(run, shards, steps: int) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "mtp_dist.train", "--config", "configs/tiny.yaml",
        "data.synthetic=false", f"data.paths=[{shards}]", f"model.vocab_size={VOCAB}",
        f"train.steps={steps}", "train.warmup_steps=1", "logging.wandb=false", f"run.dir={run}",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR")}
    return subprocess.run(
        cmd, cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


def test_resume_on_shards_of_another_tokenizer_of_the_same_vocab_size_is_refused(tmp_path):
    docs = stdlib_docs(80)
    hashes = []
    for name, part in (("a", docs[:40]), ("b", docs[40:])):
        lines = (ln for d in part for ln in d.split("\n") if ln.strip())
        opts = SentencePieceOptions(vocab_size=VOCAB, seed=0)
        tok = train_sentencepiece(lines, str(tmp_path / f"tok_{name}"), opts)
        write_jsonl(tmp_path / f"{name}.jsonl", docs)
        tokenize([tmp_path / f"{name}.jsonl"], tmp_path / f"shards_{name}",
                 tokenizer=str(tmp_path / f"tok_{name}.model"))  # fmt: skip
        hashes.append(load_manifest(str(tmp_path / f"shards_{name}"))["tokenizer"]["hash"])
        assert tok.vocab_size == VOCAB
    assert hashes[0] != hashes[1]

    first = train(tmp_path / "run", tmp_path / "shards_a", steps=2)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = train(tmp_path / "run", tmp_path / "shards_b", steps=4)
    errors = [ln for ln in resumed.stderr.splitlines() if ln.startswith("error: ")]
    assert resumed.returncode == 2 and len(errors) == 1, resumed.stderr[-3000:]
    assert f"was trained with tokenizer {hashes[0][:12]}" in errors[0]
    assert f"the data uses {hashes[1][:12]}" in errors[0]
