"""`python -m data_prep <command>`: train-tokenizer, tokenize, stdlib-corpus, manifest."""

from __future__ import annotations

import argparse
import json
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
        help="JSON Lines / Parquet / datasets field holding the text",
    )
    p.add_argument("--hf-split", default="train", help="split of a Hugging Face dataset")


def _read_opts(a: argparse.Namespace) -> ReadOptions:
    return ReadOptions(text_mode=a.text_mode, text_field=a.text_field, hf_split=a.hf_split)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    t.add_argument("--vocab-size", type=int, default=32000)
    t.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    t.add_argument("--no-byte-fallback", dest="byte_fallback", action="store_false")
    t.add_argument("--character-coverage", type=float, default=0.99995)
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
        type=int,
        default=2_000_000,
        help="sample this many lines for training (0: all)",
    )
    t.add_argument("--max-sentence-length", type=int, default=16384, help="in bytes")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--threads",
        type=int,
        default=1,
        help="training threads; >1 is faster but may not be deterministic",
    )

    k = sub.add_parser(
        "tokenize",
        help="tokenize corpora into megatron-core .bin/.idx shards",
        description="One output shard per input shard, written by the worker "
        "that tokenizes it; rerunning skips complete shards and redoes partial "
        "ones. Exit status 1 on a bad input file.",
    )
    _add_read_args(k)
    k.add_argument("--output-dir", required=True)
    k.add_argument("--tokenizer", required=True, help="'byte', a .model file, or a directory")
    k.add_argument("--workers", type=int, default=1, help="worker processes")
    k.add_argument("--threads-per-worker", type=int, default=1, help="sentencepiece threads")
    k.add_argument(
        "--files-per-shard",
        type=int,
        default=1,
        help="group this many input files into one output shard",
    )
    k.add_argument(
        "--hf-num-shards",
        type=int,
        default=1,
        help="split each Hugging Face dataset into this many shards",
    )
    k.add_argument(
        "--task-index",
        type=int,
        default=None,
        help="this task's index (default: $SLURM_ARRAY_TASK_ID or 0)",
    )
    k.add_argument(
        "--num-tasks",
        type=int,
        default=None,
        help="number of tasks sharing the inputs (default: $SLURM_ARRAY_TASK_COUNT or 1)",
    )
    k.add_argument(
        "--skip-bad-files",
        action="store_true",
        help="skip unreadable inputs and record them in the manifest instead of failing",
    )
    k.add_argument("--no-progress", dest="progress", action="store_false")

    s = sub.add_parser(
        "stdlib-corpus",
        help="write a corpus of Python stdlib sources",
        description="Write a corpus from this Python's standard-library *.py "
        "files (deterministic order), for demos that need no download.",
    )
    s.add_argument("out_dir")
    s.add_argument("--max-mb", type=float, default=None, help="stop after this many MB")
    s.add_argument("--num-shards", type=int, default=4)
    s.add_argument("--format", default="jsonl", choices=["jsonl", "text"])

    m = sub.add_parser(
        "manifest",
        help="re-merge and print an output directory's manifest",
        description="Merge the per-shard sidecars of OUT_DIR into manifest.json "
        "and print its totals.",
    )
    m.add_argument("out_dir")
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
    )
    tok = train_sentencepiece(_sentences(a), a.output, opts)
    print(json.dumps({"model": a.output + ".model", **tok.identity}, indent=2))
    return 0


def cmd_tokenize(a: argparse.Namespace) -> int:
    from data_prep.tokenize import TokenizeConfig, format_summary, run_tokenize, slurm_task_default

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
        task_index=(
            a.task_index
            if a.task_index is not None
            else slurm_task_default("SLURM_ARRAY_TASK_ID", 0)
        ),
        num_tasks=(
            a.num_tasks
            if a.num_tasks is not None
            else slurm_task_default("SLURM_ARRAY_TASK_COUNT", 1)
        ),
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


def cmd_manifest(a: argparse.Namespace) -> int:
    from data_prep.manifest import merge_manifest

    m = merge_manifest(a.out_dir)
    print(json.dumps({k: m[k] for k in ("tokenizer", "complete", "totals")}, indent=2))
    return 0


COMMANDS = {
    "train-tokenizer": cmd_train_tokenizer,
    "tokenize": cmd_tokenize,
    "stdlib-corpus": cmd_stdlib_corpus,
    "manifest": cmd_manifest,
}


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return COMMANDS[a.command](a)
    except (BadInputFile, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
