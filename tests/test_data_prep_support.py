"""Helpers shared by the data tests (no tests here): a small tokenizer trained once per session on
stdlib text, small corpora, and shard readers."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
_SESSION_DIR = tempfile.mkdtemp(prefix="mtp-data-tests-")
atexit.register(shutil.rmtree, _SESSION_DIR, True)


def stdlib_docs(n: int = 40, max_chars: int = 20_000) -> list[str]:
    """Deterministic real-world documents: the first n small stdlib sources."""
    from data_prep.stdlib_corpus import stdlib_files

    docs = []
    for path in stdlib_files():
        text = Path(path).read_bytes().decode("utf-8", errors="replace")
        if 200 < len(text) <= max_chars:
            docs.append(text)
        if len(docs) == n:
            break
    return docs


@functools.cache
def spm_model(vocab_size: int = 400) -> str:
    """Path of a small BPE model trained on stdlib text (trained once per session)."""
    from data_prep.tokenizers import SentencePieceOptions, train_sentencepiece

    lines = (ln for d in stdlib_docs(120) for ln in d.split("\n") if ln.strip())
    prefix = os.path.join(_SESSION_DIR, f"spm{vocab_size}")
    train_sentencepiece(lines, prefix, SentencePieceOptions(vocab_size=vocab_size, seed=0))
    return prefix + ".model"


def read_shard(prefix: str) -> list[np.ndarray]:
    """Every document of a .bin/.idx shard, read with megatron-core's own reader."""
    from mtp_dist.compat import ignore_known_warnings

    ignore_known_warnings()  # megatron-core's import notes that Apex/TE are absent
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    # Copies: the arrays are views of an mmap that closes with `ds`.
    return [np.array(ds[i]) for i in range(len(ds))]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "data_prep", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def dir_bytes(path: str) -> dict[str, bytes]:
    """Every file of a directory (recursively) with its bytes, for byte-identity checks; lock
    files are not output (they name the process that held them)."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            if f.endswith(".lock"):
                continue
            full = os.path.join(root, f)
            out[os.path.relpath(full, path)] = Path(full).read_bytes()
    return out


def leftovers(root) -> list[str]:
    """Temp and partial files anywhere under root."""
    found = []
    for dirpath, _, files in os.walk(root):
        found += [os.path.join(dirpath, f) for f in files if ".tmp." in f or ".partial" in f]
    return found


def tokenize_args(inputs, out, tokenizer="byte", *extra):
    return ["tokenize", *map(str, inputs), "--output-dir", str(out), "--tokenizer", tokenizer,
            "--no-progress", *extra]  # fmt: skip
