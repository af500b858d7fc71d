"""Training samples from data_prep's shards, through megatron-core's BlendedMegatronDatasetBuilder
and GPTDataset.

A sample carries seq_length + n_future_tokens tokens, so that head i (predicting token t+i) has a
real target at every one of the seq_length input positions. GPTDataset draws sequence_length + 1
tokens per sample; configured with sequence_length = seq_length + n - 1 it draws exactly the
window we need, and we return that window whole instead of GPTDataset's (tokens, labels) pair.

Sample order depends on the seed, the split, the blend and num_samples only: never on the
TP/PP/DP layout. Documents are packed across end-of-document tokens (no attention reset) and
the end-of-document token is a target, as in megatron's defaults.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from data_prep import manifest as mf
from mtp_dist.compat import ignore_known_warnings
from mtp_dist.compat.megatron_data import blended_builder_class
from mtp_dist.config import ConfigError
from mtp_dist.errors import UserError


class DataError(UserError, ValueError):
    """Training data that cannot be used as given; the message names it and the fix."""


class TokenizerMismatchError(DataError):
    """Shards made with another tokenizer than the configured one."""


def configured_tokenizer_hash(tokenizer: str | None, vocab_size: int) -> str | None:
    """Load data.tokenizer (once): check model.vocab_size against it and return its identity
    hash (None without a configured tokenizer)."""
    if tokenizer is None:
        return None
    from data_prep.tokenizers import load_tokenizer

    try:
        tok = load_tokenizer(tokenizer)
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"data.tokenizer={tokenizer!r} cannot be loaded: {e}") from e
    if tok.vocab_size != vocab_size:
        raise ConfigError(
            f"model.vocab_size={vocab_size} does not match the tokenizer {tokenizer!r} "
            f"(vocabulary {tok.vocab_size}): set model.vocab_size={tok.vocab_size}"
        )
    return tok.identity_hash


class _TokenizerIdentity:
    """What GPTDatasetConfig needs of a tokenizer: sizes, special ids, and an identity that
    megatron folds into its index-cache key (so a new tokenizer never hits an old cache)."""

    def __init__(self, vocab_size: int, eod: int, pad: int, identity_hash: str) -> None:
        self.vocab_size, self.eod, self.pad = vocab_size, eod, pad
        self.unique_identifiers = {
            "class": "mtp_dist tokenizer",
            "hash": identity_hash,
            "vocab_size": vocab_size,
            "eod": eod,
            "pad": pad,
        }


class _FullWindow:
    """Mixin for GPTDataset: return the whole token window and a target mask."""

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        # GPTDataset pads a short window with self._pad_token_id (the tokenizer's pad id, or -1).
        text, _ = self._query_document_sample_shuffle_indices(idx)
        tokens = torch.from_numpy(np.asarray(text, dtype=np.int64))
        real = tokens != self._pad_token_id
        fill = self.config.tokenizer.pad if self.config.tokenizer.pad >= 0 else 0
        return {"tokens": torch.where(real, tokens, fill), "loss_mask": real.float()}


class Samples(Dataset):
    """The top-level dataset handed to the trainer: items are exactly {"tokens", "loss_mask"}."""

    def __init__(self, inner, window: int) -> None:
        self.inner, self.window = inner, window

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        item = self.inner[idx]
        return {"tokens": item["tokens"], "loss_mask": item["loss_mask"]}


def resolve_shards(
    paths: Sequence[str],
    weights: Sequence[float] | None,
    vocab_size: int,
    tokenizer_hash: str | None,
) -> tuple[list[str], list[float], dict]:
    """Shard prefixes and blend weights from output directories (or single shard prefixes).

    A directory's weight is spread over its shards by token count; without weights every shard
    weighs its token count. Refuses incomplete directories and shards of another tokenizer.
    """
    if weights is not None and len(weights) != len(paths):
        raise DataError(f"{len(paths)} data paths but {len(weights)} weights")
    prefixes: list[str] = []
    blend: list[float] = []
    identity = None
    for k, path in enumerate(paths):
        sidecars, where = _sidecars_of(path)
        for sc in sidecars:
            identity = _check_tokenizer(
                sc["tokenizer"], where, vocab_size, tokenizer_hash, identity
            )
        total = sum(sc["tokens"] for sc in sidecars)
        for sc in sidecars:
            prefixes.append(mf.shard_prefix(where, sc["shard"]))
            share = sc["tokens"] / total
            blend.append(share * (weights[k] if weights is not None else total))
    return prefixes, blend, identity


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
    return h.hexdigest(), tokenizer["hash"]


def _sidecars_of(path: str) -> tuple[list[dict], str]:
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
            raise DataError(f"{path}: shard {sc and sc.get('shard')} is missing or partial")
    if not sidecars:
        raise DataError(f"{path}: no complete shards")
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


def _check_splits(prefixes: list[str], split_matrix, num_samples) -> None:
    """GPTDataset loops forever on a split part with no documents: refuse it up front."""
    for prefix in prefixes:
        where, name = os.path.split(prefix)
        n = mf.read_sidecar(where, name)["documents"]
        for i, bounds in enumerate(split_matrix):
            if bounds is None or not num_samples[i]:
                continue
            if int(round(bounds[1] * n)) - int(round(bounds[0] * n)) <= 0:
                raise DataError(
                    f"shard {prefix} has {n} documents, so split part {i} (train/valid/test) "
                    "gets none; make fewer, larger shards or change the split"
                )


def _builder_classes():
    with warnings.catch_warnings():
        ignore_known_warnings()  # megatron-core's import notes that Apex/TE are absent
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    class MTPGPTDataset(_FullWindow, GPTDataset):
        pass

    class MTPMockGPTDataset(_FullWindow, MockGPTDataset):
        pass

    return MTPGPTDataset, MTPMockGPTDataset, blended_builder_class(), GPTDatasetConfig


def build_datasets(
    paths: list[str] | None,
    weights: list[float] | None,
    split: str,
    seq_length: int,
    n_future_tokens: int,
    seed: int,
    num_samples: tuple[int, int, int],
    vocab_size: int,
    tokenizer_hash: str | None = None,
    synthetic: bool = False,
    cache_dir: str | None = None,
) -> tuple[Dataset, Dataset | None, Dataset | None]:
    """(train, valid, test) datasets; valid/test are None when their num_samples is 0.

    Each item: {"tokens": LongTensor[S + n], "loss_mask": FloatTensor[S + n]} with
    S = seq_length, n = n_future_tokens; loss_mask[j] = 0 where token j is padding.
    Call it on every rank: with torch.distributed initialised, rank 0 builds the index caches
    first (in cache_dir, default <first data dir>/index-cache, which must be shared by all
    ranks) and the others then load them.
    """
    if n_future_tokens < 1 or seq_length < 1:
        raise DataError(
            f"need seq_length >= 1 and n_future_tokens >= 1, got {seq_length}, {n_future_tokens}"
        )
    window = seq_length + n_future_tokens
    gpt_cls, mock_cls, builder_cls, GPTDatasetConfig = _builder_classes()
    if synthetic:
        tokenizer = _TokenizerIdentity(vocab_size, eod=vocab_size - 1, pad=-1, identity_hash="")
        blend, cls = None, mock_cls
    else:
        if not paths:
            raise DataError("no data paths given (or use synthetic data)")
        prefixes, blend_weights, tok = resolve_shards(paths, weights, vocab_size, tokenizer_hash)
        tokenizer = _TokenizerIdentity(vocab_size, tok["eod_id"], tok["pad_id"], tok["hash"])
        # One shard without weights: a plain GPTDataset, no single-member BlendedDataset.
        blend = (prefixes, None if len(prefixes) == 1 else blend_weights)
        cls = gpt_cls
        if cache_dir is None:
            cache_dir = os.path.join(os.path.dirname(prefixes[0]), "index-cache")
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=window - 1,
        blend=blend,
        split=None if synthetic else split,
        path_to_cache=None if synthetic else cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        add_extra_token_to_sequence=True,
    )
    if not synthetic:
        _check_splits(blend[0], config.split_matrix, num_samples)
    sizes = [int(n) for n in num_samples]
    built = builder_cls(cls, sizes, lambda: True, config).build()
    out = []
    for i, ds in enumerate(built):
        out.append(None if ds is None or sizes[i] == 0 else Samples(ds, window))
    if out[0] is None:
        raise DataError(f"split {split!r} and num_samples {num_samples} leave no training data")
    return out[0], out[1], out[2]
