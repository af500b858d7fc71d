"""`python -m mtp_dist.demo`: the whole path on one machine, with nothing to download.

1. a corpus from the running Python's standard-library sources (python -m data_prep stdlib-corpus),
   in 4 files
2. a sentencepiece BPE tokenizer trained on it (python -m data_prep train-tokenizer), the same
   model on every run (a seeded sample of lines, 1 training thread)
3. memory-mapped shards (python -m data_prep tokenize, 2 workers: one shard per corpus file)
4. pretraining of a small n=4 model on CPU with 2 processes (torchrun -m mtp_dist.train)

Each stage is skipped when its output is complete, so a rerun continues (training resumes from
its latest checkpoint). The same commands, with a cluster config, scale to the cluster.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from mtp_dist.distributed import free_port


def _run(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mtp_dist.demo", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="runs/demo", help="where corpus, tokenizer, shards go")
    p.add_argument("--config", default="configs/small.yaml")
    p.add_argument("--nproc", type=int, default=2, help="training processes (torchrun)")
    p.add_argument("--corpus-mb", type=int, default=12, help="stdlib text to use (MB)")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("overrides", nargs="*", help="extra training overrides, e.g. train.steps=50")
    args = p.parse_args(argv)
    work = Path(args.workdir)
    py = sys.executable
    corpus, tok, shards = work / "corpus", work / "tokenizer", work / "shards"
    if not (corpus / ".done").exists():
        _run([py, "-m", "data_prep", "stdlib-corpus", str(corpus), "--max-mb", str(args.corpus_mb)])
        (corpus / ".done").write_text("ok")
    # The corpus files, not the directory: a directory is read as one Hugging Face dataset,
    # which would make one shard for one worker.
    files = str(corpus / "*.jsonl")
    if not (tok / "tokenizer.model").exists():
        tok.mkdir(parents=True, exist_ok=True)
        _run([py, "-m", "data_prep", "train-tokenizer", files, "--output",
              str(tok / "tokenizer"), "--vocab-size", str(args.vocab_size), "--threads", "1",
              "--input-sentence-size", "300000"])  # fmt: skip
    _run([py, "-m", "data_prep", "tokenize", files, "--output-dir", str(shards),
          "--tokenizer", str(tok / "tokenizer.model"), "--workers", "2"])  # fmt: skip
    overrides = [
        f"data.paths=[{shards}]",
        f"data.tokenizer={tok / 'tokenizer.model'}",
        f"model.vocab_size={args.vocab_size}",
        f"run.dir={work / 'run'}",
        *args.overrides,
    ]
    train = ["-m", "mtp_dist.train", "--config", args.config, *overrides]
    if args.nproc > 1:
        launcher = [py, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}",
                    f"--master-port={free_port()}"]  # fmt: skip
        _run([*launcher, *train])
    else:
        _run([py, *train])
    _run([py, "-m", "mtp_dist.report", str(work / "run")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
