"""`python -m data_prep <command>`: train-tokenizer, tokenize, stdlib-corpus, induction-corpus,
induction-copy, manifest, verify.

Every command follows mtp_dist.errors' contract: bad input (a bad file, option or environment
variable, an OS error) is one `error:` line and exit status 2, Ctrl-C is exit status 130.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections.abc import Iterator

from data_prep.decompress import CODECS
from data_prep.readers import (
    FORMATS,
    INPUT_FORMATS,
    OTHER_FILES,
    TEXT_MODES,
    BadInputFile,
    DocumentReader,
    ReadOptions,
    ReadStats,
    plan_input_shards,
)
from mtp_dist.errors import EXIT_USAGE, UserError, number, run_cli


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as one `error:` line (exit status 2, as argparse's)."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _format_help() -> str:
    by_suffix = [f"{'/'.join(f.suffixes)} = {f.title}" for f in INPUT_FORMATS if f.suffixes]
    directory = next(f.title for f in INPUT_FORMATS if f.directory)
    compressed = "/".join(s for c in CODECS for s in c.suffixes)
    return (
        f"input format; auto: by extension ({', '.join(by_suffix)}, also compressed "
        f"{compressed}; directory = {directory}, anything else = {OTHER_FILES})"
    )


def _add_read_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="files, globs (quote them) or dataset directories")
    p.add_argument(
        "--format",
        default="auto",
        choices=FORMATS,
        help=_format_help(),
    )
    p.add_argument(
        "--text-mode",
        default="file",
        choices=TEXT_MODES,
        help="text inputs: one document per file, per line, or per blank-line block",
    )
    p.add_argument(
        "--text-field",
        default="text",
        help="JSON Lines / Parquet / datasets field holding the text (a file where no record "
        "has it is a bad file; in other files, records without it are skipped and counted)",
    )
    p.add_argument("--hf-split", default="train", help="split of a Hugging Face dataset")


def _read_opts(a: argparse.Namespace) -> ReadOptions:
    return ReadOptions(text_mode=a.text_mode, text_field=a.text_field, hf_split=a.hf_split)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m data_prep", description="Tokenizers and megatron-core token shards."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "train-tokenizer",
        help="train a sentencepiece tokenizer",
        description="Train a sentencepiece tokenizer (Llama-style BPE with byte "
        "fallback by default). Writes OUTPUT.model and OUTPUT.vocab. For the byte "
        "tokenizer nothing needs training: use `--tokenizer byte` elsewhere.",
    )
    _add_read_args(t)
    t.add_argument("--output", required=True, help="output prefix, e.g. tok/tokenizer")
    t.add_argument("--vocab-size", type=_at_least(1), default=32000)
    t.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    t.add_argument("--no-byte-fallback", dest="byte_fallback", action="store_false")
    t.add_argument("--character-coverage", type=number(0, 1), default=0.99995)
    t.add_argument(
        "--no-split-digits",
        dest="split_digits",
        action="store_false",
        help="keep runs of digits together (default: one digit per token)",
    )
    t.add_argument(
        "--remove-extra-whitespaces",
        action="store_true",
        help="collapse whitespace runs (default: keep them; code needs them)",
    )
    t.add_argument(
        "--no-whitespace-only-pieces", dest="allow_whitespace_only_pieces", action="store_false"
    )
    t.add_argument("--no-dummy-prefix", dest="add_dummy_prefix", action="store_false")
    t.add_argument(
        "--normalization",
        default="identity",
        help="sentencepiece normalization rule (identity, nfkc, ...)",
    )
    t.add_argument(
        "--input-sentence-size",
        type=_at_least(0),
        default=2_000_000,
        help="train on a sample of this many lines, the same for the same inputs and --seed "
        "(0: all lines)",
    )
    t.add_argument("--max-sentence-length", type=_at_least(1), default=16384, help="in bytes")
    t.add_argument("--seed", type=_at_least(0), default=0)
    t.add_argument(
        "--user-symbols",
        metavar="FILE",
        help="a file of pieces, one a line, each always one token (the induction corpus's "
        "name_pieces.txt)",
    )
    t.add_argument(
        "--threads",
        type=_at_least(1),
        default=1,
        help="training threads; >1 is faster but gives another model than 1 thread",
    )

    k = sub.add_parser(
        "tokenize",
        help="tokenize corpora into megatron-core .bin/.idx shards",
        description="One output shard per input shard, written by the worker "
        "that tokenizes it; rerunning skips complete shards and redoes partial "
        "ones. Exit status 2 on a bad input file, 130 on Ctrl-C (what finished is kept).",
    )
    _add_read_args(k)
    k.add_argument("--output-dir", required=True)
    k.add_argument("--tokenizer", required=True, help="'byte', a .model file, or a directory")
    k.add_argument("--workers", type=_at_least(1), default=1, help="worker processes")
    k.add_argument(
        "--threads-per-worker", type=_at_least(1), default=1, help="sentencepiece threads"
    )
    k.add_argument(
        "--files-per-shard",
        type=_at_least(1),
        default=1,
        help="group this many input files into one output shard",
    )
    k.add_argument(
        "--hf-num-shards",
        type=_at_least(1),
        default=1,
        help="split each Hugging Face dataset into this many shards",
    )
    k.add_argument(
        "--task-index",
        type=_at_least(0),
        default=None,
        help="this task's index (default: $SLURM_ARRAY_TASK_ID or 0)",
    )
    k.add_argument(
        "--num-tasks",
        type=_at_least(1),
        default=None,
        help="number of tasks sharing the inputs (default: $SLURM_ARRAY_TASK_COUNT or 1)",
    )
    k.add_argument(
        "--skip-bad-files",
        action="store_true",
        help="skip unreadable inputs and record them in the manifest as skipped instead of "
        "failing (the directory is complete without them; a rerun tries them again)",
    )
    k.add_argument("--no-progress", dest="progress", action="store_false")

    s = sub.add_parser(
        "stdlib-corpus",
        help="write a corpus of Python stdlib sources",
        description="Write a corpus from this Python's standard-library *.py "
        "files (deterministic order), for demos that need no download.",
    )
    s.add_argument("out_dir")
    s.add_argument("--max-mb", type=number(0), default=None, help="stop after this many MB")
    s.add_argument("--num-shards", type=_at_least(1), default=4)
    s.add_argument("--format", default="jsonl", choices=["jsonl", "text"])

    i = sub.add_parser(
        "induction-corpus",
        help="write the induction task's corpus (stdlib functions, locals renamed)",
        description="Write the induction task of Gloeckle et al. 2024 (Section 4.1) from this "
        "Python's standard library: one document per function, its local names renamed "
        "consistently to random two-piece names (data_prep/induction.py). Writes OUT/train/, "
        "OUT/heldout/ (JSON Lines, for `tokenize`), OUT/names.json and OUT/name_pieces.txt "
        "(for `train-tokenizer --user-symbols`). The same --seed gives the same corpus.",
    )
    i.add_argument("out_dir")
    i.add_argument("--seed", type=_at_least(0), default=0)
    i.add_argument("--max-mb", type=number(0), default=8.0, help="training source files (MB)")
    i.add_argument("--heldout-mb", type=number(0), default=0.5, help="held-out source files (MB)")
    i.add_argument("--num-shards", type=_at_least(1), default=4, help="training shards")
    i.add_argument("--first-names", type=_at_least(1), default=64, help="first-half pool size")
    i.add_argument(
        "--second-names",
        type=_at_least(2),
        default=32,
        help="second-half pool size (chance of guessing a second half: 1 / this)",
    )
    i.add_argument("--no-progress", dest="progress", action="store_false")

    c = sub.add_parser(
        "induction-copy",
        help="write the induction task's copy control (a line of names, then the line again)",
        description="Write the copy control of the induction task (data_prep/induction.py): "
        "documents of random names from CORPUS's pools, written twice, so half of each is "
        "predictable by induction alone. Tokenize OUT/train/ and OUT/heldout/ with CORPUS's "
        "tokenizer; score with `evaluate induction --names OUT/names.json`.",
    )
    c.add_argument("corpus", help="an induction corpus (the output of induction-corpus)")
    c.add_argument("out_dir")
    c.add_argument("--seed", type=_at_least(0), default=0)
    c.add_argument("--docs", type=_at_least(1), default=40_000, help="training documents")
    c.add_argument("--heldout-docs", type=_at_least(1), default=600)
    c.add_argument("--pool", type=_at_least(2), default=16, help="first and second halves drawn")
    c.add_argument("--names", type=_at_least(1), default=15, help="names per line")

    m = sub.add_parser(
        "manifest",
        help="re-merge and print an output directory's manifest",
        description="Merge the per-shard sidecars of OUT_DIR into manifest.json "
        "and print its totals.",
    )
    m.add_argument("out_dir")

    v = sub.add_parser(
        "verify",
        help="check every shard of an output directory against its manifest",
        description="Recompute each shard's sha256 and compare it, and the file sizes and "
        "the .idx's consistency, with the manifest. Prints one line per shard; exit status 2 "
        "if any shard is bad or missing.",
    )
    v.add_argument("out_dir")
    return parser


def _sentences(a: argparse.Namespace) -> Iterator[str]:
    """Lines of the documents: sentencepiece trains on lines."""
    for shard in plan_input_shards(a.inputs, a.format, 1, 1):
        for doc in DocumentReader(shard, _read_opts(a), ReadStats()):
            for line in doc.split("\n"):
                if line.strip():
                    yield line


def cmd_train_tokenizer(a: argparse.Namespace) -> int:
    from data_prep.tokenizers import SentencePieceOptions, train_sentencepiece

    opts = SentencePieceOptions(
        vocab_size=a.vocab_size,
        model_type=a.model_type,
        byte_fallback=a.byte_fallback,
        character_coverage=a.character_coverage,
        split_digits=a.split_digits,
        remove_extra_whitespaces=a.remove_extra_whitespaces,
        allow_whitespace_only_pieces=a.allow_whitespace_only_pieces,
        add_dummy_prefix=a.add_dummy_prefix,
        normalization_rule_name=a.normalization,
        input_sentence_size=a.input_sentence_size,
        max_sentence_length=a.max_sentence_length,
        seed=a.seed,
        num_threads=a.threads,
        user_defined_symbols=_user_symbols(a.user_symbols),
    )
    from mtp_dist.files import check_not_an_input

    inputs = [f for pattern in a.inputs for f in (glob.glob(pattern) or [pattern])]
    outputs = [a.output + ".model", a.output + ".vocab"]
    check_not_an_input(outputs, inputs, "train-tokenizer")
    try:
        tok = train_sentencepiece(_sentences(a), a.output, opts)
    except BadInputFile as e:  # without tokenize's hint: train-tokenizer has no --skip-bad-files
        raise UserError(f"{e.path}: {e.problem}; {e.fix}") from None
    print(json.dumps({"model": a.output + ".model", **tok.identity}, indent=2))
    return 0


def _user_symbols(path: str | None) -> list[str] | None:
    if path is None:
        return None
    from mtp_dist.files import read_utf8

    symbols = [line for line in read_utf8(path, "--user-symbols").splitlines() if line]
    if not symbols or any(s != s.strip() for s in symbols):
        raise UserError(
            f"--user-symbols {path}: give one piece a line, without spaces (and at least one)"
        )
    return symbols


def cmd_tokenize(a: argparse.Namespace) -> int:
    from data_prep.tokenize import TokenizeConfig, format_summary, run_tokenize, slurm_task

    if a.task_index is None or a.num_tasks is None:
        env_index, env_count = slurm_task(num_tasks=a.num_tasks)
        a.task_index = env_index if a.task_index is None else a.task_index
        a.num_tasks = env_count
    cfg = TokenizeConfig(
        inputs=a.inputs,
        out_dir=a.output_dir,
        tokenizer=a.tokenizer,
        fmt=a.format,
        read_opts=_read_opts(a),
        files_per_shard=a.files_per_shard,
        hf_num_shards=a.hf_num_shards,
        workers=a.workers,
        threads_per_worker=a.threads_per_worker,
        task_index=a.task_index,
        num_tasks=a.num_tasks,
        skip_bad_files=a.skip_bad_files,
        progress=a.progress,
    )
    print(format_summary(run_tokenize(cfg)))
    return 0


def cmd_stdlib_corpus(a: argparse.Namespace) -> int:
    from data_prep.stdlib_corpus import write_stdlib_corpus

    for path in write_stdlib_corpus(a.out_dir, a.max_mb, a.num_shards, a.format):
        print(path)
    return 0


def cmd_induction_corpus(a: argparse.Namespace) -> int:
    from data_prep.induction import write_induction_corpus

    info = write_induction_corpus(
        a.out_dir,
        a.seed,
        a.max_mb,
        a.heldout_mb,
        a.num_shards,
        a.first_names,
        a.second_names,
        progress=a.progress,
    )
    print(json.dumps({k: v for k, v in info.items() if k not in ("first", "second")}, indent=2))
    return 0


def cmd_induction_copy(a: argparse.Namespace) -> int:
    from data_prep.induction import write_copy_corpus

    info = write_copy_corpus(a.corpus, a.out_dir, a.seed, a.docs, a.heldout_docs, a.pool, a.names)
    print(json.dumps({k: v for k, v in info.items() if k not in ("first", "second")}, indent=2))
    return 0


def cmd_manifest(a: argparse.Namespace) -> int:
    from data_prep.manifest import merge_manifest

    _require_shard_dir(a.out_dir)
    m = merge_manifest(a.out_dir)
    print(json.dumps({k: m[k] for k in ("tokenizer", "complete", "totals")}, indent=2))
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from data_prep.verify import format_report, verify_directory

    _require_shard_dir(a.out_dir)
    report = verify_directory(a.out_dir)
    print(format_report(report))
    report.raise_if_bad()
    return 0


def _require_shard_dir(path: str) -> None:
    from data_prep.manifest import ManifestError

    if not os.path.isdir(path):
        raise ManifestError(
            f"{path} is not a directory: give the --output-dir of `python -m data_prep tokenize`"
        )


COMMANDS = {
    "train-tokenizer": cmd_train_tokenizer,
    "tokenize": cmd_tokenize,
    "stdlib-corpus": cmd_stdlib_corpus,
    "induction-corpus": cmd_induction_corpus,
    "induction-copy": cmd_induction_copy,
    "manifest": cmd_manifest,
    "verify": cmd_verify,
}


def main(argv: list[str] | None = None) -> int:
    # Parsed inside run_cli: --help into a closed pipe ends as quietly as any output.
    return run_cli(lambda: _dispatch(build_parser().parse_args(argv)))


def _dispatch(a: argparse.Namespace) -> int:
    return COMMANDS[a.command](a)
