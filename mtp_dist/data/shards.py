"""data.paths -> the shards training reads, checked: complete, one tokenizer, sound indices.

Each shard is checked as it is resolved, in O(1): its sidecar says complete, its files have the
recorded sizes, and its .idx header agrees with both (data_prep.shard_index.open_index). The
O(documents) check of every length and pointer in the .idx (`verify_indices`) runs on one rank,
which shares the verdict, so a damaged shard is an error on every rank and never a hang.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

from data_prep import manifest as mf
from data_prep.shard_index import ShardError, ShardIndex, check_index, open_index
from mtp_dist.errors import UserError


class DataError(UserError, ValueError):
    """Training data that cannot be used as given; the message names it and the fix."""


class TokenizerMismatchError(DataError):
    """Shards made with another tokenizer than the configured one."""


@dataclass(frozen=True)
class Shard:
    prefix: str
    sidecar: dict
    index: ShardIndex
    path: int
    """Which entry of data.paths the shard belongs to."""

    @property
    def documents(self) -> int:
        return self.sidecar["documents"]

    def part(self, bounds: tuple[float, float]) -> range:
        """The documents of a split part, rounded as megatron-core's builder rounds them."""
        n = self.documents
        return range(int(round(bounds[0] * n)), int(round(bounds[1] * n)))

    def tokens(self, part: range) -> int:
        return self.index.tokens_between(part.start, part.stop)


def resolve_shards(
    paths: Sequence[str], vocab_size: int, tokenizer_hash: str | None
) -> tuple[list[Shard], dict]:
    """The complete shards of data.paths (directories or single shard prefixes) and the
    tokenizer identity they share; refuses incomplete directories, damaged shards and shards of
    another tokenizer (or vocabulary size)."""
    shards: list[Shard] = []
    identity = None
    for k, path in enumerate(paths):
        sidecars, where = _sidecars_of(path)
        for sc in sidecars:
            tok = sc["tokenizer"]
            identity = _check_tokenizer(tok, where, vocab_size, tokenizer_hash, identity)
            prefix = mf.shard_prefix(where, sc["shard"])
            shards.append(Shard(prefix, sc, open_index(prefix, sc), k))
    if sum(s.documents for s in shards) == 0:
        raise DataError(
            f"data.paths {list(paths)} hold no documents: tokenize a corpus that has some "
            "(the directory's manifest.json counts what was skipped)"
        )
    return shards, identity


def verify_indices(shards: list[Shard]) -> None:
    """check_index on every shard, on rank 0 only (every rank would read every .idx), with the
    verdict broadcast so that all ranks raise the same error or none."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    error = None
    if not distributed or dist.get_rank() == 0:
        try:
            for shard in shards:
                check_index(shard.index)
        except ShardError as e:
            error = e
    if distributed:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise error


def data_identity(paths: Sequence[str], vocab_size: int) -> tuple[str, str]:
    """(fingerprint, tokenizer hash) of the shards under data.paths, from their manifests: the
    fingerprint changes when any shard's content, or the paths' order, changes (not when the
    directories move); the tokenizer hash is what the shards were made with."""
    h = hashlib.sha256()
    tokenizer = None
    for path in paths:
        sidecars, where = _sidecars_of(path)
        for sc in sidecars:
            tokenizer = _check_tokenizer(sc["tokenizer"], where, vocab_size, None, tokenizer)
            h.update(f"{sc['shard']}:{sc['tokens']}:{sc.get('sha256')};".encode())
        h.update(b"|")
    if tokenizer is None:
        raise DataError(f"data.paths {list(paths)} hold no complete shards")
    return h.hexdigest(), tokenizer["hash"]


def _sidecars_of(path: str) -> tuple[list[dict], str]:
    """The complete shards' sidecars of a directory (skipped inputs have no data), or the one
    sidecar of a shard prefix; and the directory they are in."""
    path = path.removesuffix(".bin").removesuffix(".idx")
    if os.path.isdir(path):
        m = mf.load_manifest(path)
        if not m["complete"]:
            raise DataError(
                f"{path}: shard directory is incomplete (manifest.json: complete=false); finish "
                "it by rerunning `python -m data_prep tokenize` (all SLURM tasks)"
            )
        sidecars = [s for s in m["shards"] if s["status"] == "complete"]
        where = path
    else:
        where, name = os.path.split(path)
        sidecars = [mf.read_sidecar(where, name)]
    for sc in sidecars:
        if not mf.is_complete(where, sc):
            raise DataError(
                f"{path}: shard {sc and sc.get('shard')} is missing or partial: rerun "
                "`python -m data_prep tokenize` to redo it"
            )
    if not sidecars:
        raise DataError(f"{path}: no complete shards (every input was skipped as bad)")
    return sidecars, where


def _check_tokenizer(tok: dict, where: str, vocab_size: int, want_hash: str | None, seen):
    if tok["vocab_size"] != vocab_size or (want_hash is not None and tok["hash"] != want_hash):
        raise TokenizerMismatchError(
            f"shard dir {where} was tokenized with a tokenizer of vocab_size {tok['vocab_size']} "
            f"and hash {tok['hash'][:16]}..., but training is configured for vocab_size "
            f"{vocab_size} and hash {(want_hash or 'any')[:16]}...; re-tokenize the data with the "
            "configured tokenizer, or configure the tokenizer the shards were made with"
        )
    if seen is not None and seen["hash"] != tok["hash"]:
        raise TokenizerMismatchError(
            f"shard dir {where} was tokenized with another tokenizer ({tok['hash'][:16]}...) "
            f"than the other data paths ({seen['hash'][:16]}...); use one tokenizer for all"
        )
    return tok
