"""Tokenizing one input shard into one megatron-core .bin/.idx shard.

The worker that tokenizes a shard writes it, to `<name>.bin.partial` / `.idx.partial`, renames
both when complete, then writes the sidecar that marks completion. A kill at any moment leaves
either no sidecar (the shard is redone from scratch on rerun) or a complete shard.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from data_prep import manifest as mf
from data_prep.readers import BadInputFile, DocumentReader, InputShard, ReadOptions, ReadStats
from data_prep.shard_index import ShardWriter, token_dtype
from data_prep.tokenizers import Tokenizer
from mtp_dist.files import atomic_write_json

# Documents are encoded in batches of about this many characters: large enough that
# sentencepiece's batched encode dominates, small enough to bound memory per worker.
BATCH_CHARS = 8 << 20
BATCH_DOCS = 16384


@dataclass
class ShardJob:
    name: str
    shard: InputShard
    out_dir: str
    tokenizer_spec: str
    read_opts: ReadOptions
    threads: int = 1


def shard_fingerprint(job: ShardJob, tokenizer: Tokenizer) -> dict:
    """What must match for an existing sidecar to count as this job's output."""
    return {
        "input": job.shard.describe(),
        "read_options": job.read_opts.as_dict(),
        "tokenizer": tokenizer.identity,
    }


def tokenize_shard(
    job: ShardJob,
    tokenizer: Tokenizer,
    skip_bad_files: bool,
    progress: Callable[[int, int, int], None] = lambda b, d, t: None,
) -> dict:
    """Tokenize job.shard into job.out_dir/job.name.{bin,idx}; return (and write) its sidecar.

    `progress(bytes, documents, tokens)` receives increments. A BadInputFile is raised unless
    skip_bad_files, in which case the sidecar records it with status "skipped".
    """
    prefix = mf.shard_prefix(job.out_dir, job.name)
    partial = partial_paths(prefix)
    remove_leftovers(job.out_dir, job.name, keep_complete=False)
    stats = ReadStats()
    reader = DocumentReader(job.shard, job.read_opts, stats)
    writer = ShardWriter(partial["bin"], token_dtype(tokenizer.vocab_size))
    tokens = 0
    sent = [0, 0, 0]
    try:
        batch: list[str] = []
        chars = 0
        for doc in reader:
            batch.append(doc)
            chars += len(doc)
            if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
                tokens += _write_batch(writer, tokenizer, batch, job.threads)
                batch, chars = [], 0
                sent = _report(progress, sent, reader.consumed_bytes, stats.documents, tokens)
        if batch:
            tokens += _write_batch(writer, tokenizer, batch, job.threads)
        writer.finalize(partial["idx"])
        _report(progress, sent, reader.consumed_bytes, stats.documents, tokens)
    except BaseException as err:
        # A bad file, a full disk, Ctrl-C: no partial data stays behind.
        with contextlib.suppress(OSError):  # flushing the rest may fail again (a full disk)
            writer.close()
        for path in partial.values():
            if os.path.exists(path):
                os.remove(path)
        if isinstance(err, OSError) and err.filename is None:
            # A failed write of a buffered file does not say which file: name the output.
            raise OSError(err.errno, err.strerror, partial["bin"]) from err
        if not (skip_bad_files and isinstance(err, BadInputFile)):
            raise
        sidecar = {
            "format": mf.FORMAT,
            "shard": job.name,
            "status": "skipped",
            "error": f"{err.path}: {err.problem}",
            **shard_fingerprint(job, tokenizer),
            "documents": 0,
            "tokens": 0,
        }
        atomic_write_json(mf.sidecar_path(job.out_dir, job.name), sidecar)
        return sidecar

    for ext in ("bin", "idx"):
        with open(partial[ext], "rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial[ext], f"{prefix}.{ext}")
    sidecar = {
        "format": mf.FORMAT,
        "shard": job.name,
        "status": "complete",
        **shard_fingerprint(job, tokenizer),
        "documents": stats.documents,
        "tokens": tokens,
        "skipped_documents": dict(sorted(stats.skipped.items())),
        "invalid_utf8_documents": stats.invalid_utf8_documents,
        "bin_bytes": os.path.getsize(prefix + ".bin"),
        "idx_bytes": os.path.getsize(prefix + ".idx"),
        "sha256": mf.file_checksum([prefix + ".bin", prefix + ".idx"]),
    }
    atomic_write_json(mf.sidecar_path(job.out_dir, job.name), sidecar)
    return sidecar


def partial_paths(prefix: str) -> dict[str, str]:
    return {ext: f"{prefix}.{ext}.partial" for ext in ("bin", "idx")}


def remove_leftovers(out_dir: str, name: str, keep_complete: bool = True) -> None:
    """What an interrupted attempt at shard `name` left behind: partial data, a half-written
    sidecar's temp file, and .bin/.idx renamed into place but not recorded by a complete sidecar
    (all of them unless keep_complete). Only when no process is writing the shard."""
    prefix = mf.shard_prefix(out_dir, name)
    paths = list(partial_paths(prefix).values())
    if not (keep_complete and mf.is_complete(out_dir, mf.read_sidecar(out_dir, name))):
        paths += [prefix + ".bin", prefix + ".idx"]
    for path in paths:
        if os.path.exists(path):
            os.remove(path)
    mf.remove_stale_tmp(mf.sidecar_path(out_dir, name))


def _write_batch(writer: ShardWriter, tokenizer: Tokenizer, batch: list[str], threads: int) -> int:
    """Encode a batch and append it, an end-of-document token after each document."""
    flat, lengths = tokenizer.encode_flat(batch, threads)
    # np.insert at each document's end offset places one eod after every document at once.
    ends = np.cumsum(lengths)
    with_eod = np.insert(flat, ends, tokenizer.eod_id)
    writer.add_documents(with_eod, lengths + 1)
    return int(with_eod.size)


def _report(progress, sent: list[int], nbytes: int, docs: int, tokens: int) -> list[int]:
    now = [nbytes, docs, tokens]
    progress(*(a - b for a, b in zip(now, sent, strict=True)))
    return now
