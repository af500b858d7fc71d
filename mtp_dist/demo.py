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

from mtp_dist.errors import UserError, number, run_cli

DONE = ".done"


def _run(stage: str, cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), flush=True)
    code = subprocess.run(cmd).returncode
    if code != 0:
        raise UserError(
            f"the demo's {stage} stage failed (exit status {code}; its output above says why): "
            "fix that and rerun; the stages already done are skipped"
        )


def _corpus_files(corpus: Path) -> list[Path]:
    return sorted(p for p in corpus.glob("*.jsonl") if p.stat().st_size > 0)


def _corpus_done(corpus: Path) -> bool:
    """The corpus stage's marker, and the text it marks: a marker over an empty corpus (left by
    an older demo) is not done, so the stage is redone instead of failing every later rerun."""
    return (corpus / DONE).is_file() and bool(_corpus_files(corpus))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mtp_dist.demo", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="runs/demo", help="where corpus, tokenizer, shards go")
    p.add_argument("--config", default="configs/small.yaml")
    p.add_argument("--nproc", type=number(0, integer=True), default=2, help="training processes")
    p.add_argument("--corpus-mb", type=number(0), default=12, help="stdlib text to use (MB)")
    p.add_argument("--vocab-size", type=number(0, integer=True), default=8000)
    p.add_argument("overrides", nargs="*", help="extra training overrides, e.g. train.steps=50")
    return run_cli(lambda: _main(p.parse_args(argv)))


def _main(args) -> int:
    from mtp_dist import config
    from mtp_dist.distributed import free_port

    work = Path(args.workdir)
    py = sys.executable
    corpus, tok, shards = work / "corpus", work / "tokenizer", work / "shards"
    overrides = [
        f"data.paths=[{shards}]",
        f"data.tokenizer={tok / 'tokenizer.model'}",
        f"model.vocab_size={args.vocab_size}",
        f"run.dir={work / 'run'}",
        *args.overrides,
    ]
    # The training config and overrides, checked before any stage runs (a typo found now, not
    # after the data preparation); its data does not exist yet, so synthetic for the check.
    config.load(args.config, [*overrides, "data.synthetic=true", "data.tokenizer=null"])
    if not _corpus_done(corpus):
        (corpus / DONE).unlink(missing_ok=True)
        _run("corpus", [py, "-m", "data_prep", "stdlib-corpus", str(corpus), "--max-mb",
                        str(args.corpus_mb)])  # fmt: skip
        if not _corpus_files(corpus):
            raise UserError(f"the corpus {corpus} is empty: raise --corpus-mb")
        (corpus / DONE).write_text("ok")
    # The corpus files, not the directory: a directory is read as one Hugging Face dataset,
    # which would make one shard for one worker.
    files = str(corpus / "*.jsonl")
    if not (tok / "tokenizer.model").exists():  # written atomically: present means complete
        tok.mkdir(parents=True, exist_ok=True)
        _run("tokenizer", [py, "-m", "data_prep", "train-tokenizer", files, "--output",
                           str(tok / "tokenizer"), "--vocab-size", str(args.vocab_size),
                           "--threads", "1", "--input-sentence-size", "300000"])  # fmt: skip
    _run("tokenize", [py, "-m", "data_prep", "tokenize", files, "--output-dir", str(shards),
                      "--tokenizer", str(tok / "tokenizer.model"), "--workers", "2"])  # fmt: skip
    train = ["-m", "mtp_dist.train", "--config", args.config, *overrides]
    if args.nproc > 1:
        launcher = [py, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}",
                    f"--master-port={free_port()}"]  # fmt: skip
        _run("training", [*launcher, *train])
    else:
        _run("training", [py, *train])
    _run("report", [py, "-m", "mtp_dist.report", str(work / "run")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
