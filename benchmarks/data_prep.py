"""Benchmark: end-to-end `tokenize` throughput next to sentencepiece's own batched encode.

On the running Python's standard-library sources (no download): writes the corpus as JSONL
shards, trains an 8k BPE tokenizer, then measures
  - raw: sentencepiece `encode(list_of_documents, num_threads=T)` on the documents in memory
    (int lists, as most callers use it, and numpy buffers, as data_prep uses it);
  - end to end: data_prep's tokenize (read JSONL, encode, append eod, write .bin/.idx, checksum,
    manifest) with W worker processes, called in this process (the command's start-up:
    benchmarks/data_prep_startup.py).
Prints a table and writes benchmarks/results/data_prep.json.

    python benchmarks/data_prep.py [--work-dir DIR] [--vocab-size 8000] [--shards 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep.stdlib_corpus import write_stdlib_corpus  # noqa: E402
from data_prep.tokenize import TokenizeConfig, run_tokenize  # noqa: E402
from data_prep.tokenizers import (  # noqa: E402
    SentencePieceOptions,
    train_sentencepiece,
)
from mtp_dist.files import atomic_write_json  # noqa: E402


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work-dir", default=None, help="default: a temporary directory")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--output", default=os.path.join(os.path.dirname(__file__), "results", "data_prep.json")
    )
    a = p.parse_args()
    work = a.work_dir or tempfile.mkdtemp(prefix="bench-data-prep-")
    corpus = os.path.join(work, "corpus")
    paths = write_stdlib_corpus(corpus, num_shards=a.shards)
    docs = [json.loads(line)["text"] for path in paths for line in open(path, encoding="utf-8")]
    docs = [d for d in docs if d.strip()]
    text_mb = sum(len(d.encode()) for d in docs) / 1e6

    lines = (ln for d in docs for ln in d.split("\n") if ln.strip())
    opts = SentencePieceOptions(vocab_size=a.vocab_size, input_sentence_size=300_000, seed=0)
    tok = train_sentencepiece(lines, os.path.join(work, "tok", "tokenizer"), opts)
    tokens = sum(x.size for x in tok.encode_batch(docs, 2))

    rows = []
    for threads in (1, 2):
        for kind, kw in (("int lists", {}), ("numpy", {"return_type": "numpy"})):
            dt = best_of(a.repeats, lambda t=threads, k=kw: tok.sp.encode(docs, num_threads=t, **k))
            rows.append(
                {
                    "what": f"sentencepiece encode ({kind})",
                    "parallel": f"{threads} threads",
                    "seconds": dt,
                    "tokens_per_s": tokens / dt,
                }
            )

    for workers in (1, 2):
        times = []
        for _ in range(a.repeats):
            out = os.path.join(work, f"out{workers}")
            shutil.rmtree(out, ignore_errors=True)
            cfg = TokenizeConfig(
                inputs=paths, out_dir=out, tokenizer=tok.model_path, workers=workers, progress=False
            )
            t0 = time.perf_counter()
            summary = run_tokenize(cfg)
            times.append(time.perf_counter() - t0)
            assert summary["tokens"] == tokens + summary["documents"]  # + one eod per document
        dt = min(times)
        rows.append(
            {
                "what": "data_prep tokenize (end to end)",
                "parallel": f"{workers} workers",
                "seconds": dt,
                "tokens_per_s": summary["tokens"] / dt,
            }
        )

    limit = {r["parallel"][0]: r["tokens_per_s"] for r in rows if r["what"].endswith("(numpy)")}
    for r in rows:
        r["of_raw_numpy_encode"] = r["tokens_per_s"] / limit[r["parallel"][0]]
    print(
        f"corpus: {len(docs)} stdlib files, {text_mb:.1f} MB, {tokens / 1e6:.2f} M tokens "
        f"({a.vocab_size} BPE); {os.cpu_count()} cores"
    )
    print(f"{'what':<40} {'parallel':<10} {'seconds':>8} {'M tokens/s':>11} {'of limit':>9}")
    for r in rows:
        print(
            f"{r['what']:<40} {r['parallel']:<10} {r['seconds']:>8.2f} "
            f"{r['tokens_per_s'] / 1e6:>11.2f} {r['of_raw_numpy_encode']:>8.0%}"
        )
    result = {
        "corpus": {
            "documents": len(docs),
            "mb": text_mb,
            "tokens": tokens,
            "vocab_size": a.vocab_size,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg_1m": os.getloadavg()[0],
        },
        "rows": rows,
    }
    os.makedirs(os.path.dirname(a.output), exist_ok=True)
    atomic_write_json(a.output, result)
    print(f"wrote {a.output}")
    if a.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
