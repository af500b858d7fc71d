"""Training samples from data_prep's shards, through megatron-core's GPTDataset and
BlendedDataset.

A sample carries seq_length + n_future_tokens tokens, so that head i (predicting token t+i) has a
real target at every one of the seq_length input positions. GPTDataset draws sequence_length + 1
tokens per sample; configured with sequence_length = seq_length + n - 1 it draws exactly the
window we need, and we return that window whole instead of GPTDataset's (tokens, labels) pair.

Each split (train, valid, test) is built from the shards whose part of it has documents: a
small shard can have an empty validation or test part, and GPTDataset loops forever on one.
A split is built for one pass over its tokens, whatever the length of the run, so the sample
order depends on the data, the split, the blend and the seed only (never on train.steps or the
TP/PP/DP layout); the sampler (sampler.py) goes on into further epochs. megatron-core's
BlendedMegatronDatasetBuilder cannot leave a shard out of one split only, so the splits are
assembled here from the same parts it uses (GPTDataset per shard part, BlendedDataset over them,
each built through its rank-0-first `build_generic_dataset`).

Documents are packed across end-of-document tokens (no attention reset) and the
end-of-document token is a target, as in megatron's defaults.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings

import numpy as np
import torch
from torch.utils.data import Dataset

from mtp_dist.compat import ignore_known_warnings
from mtp_dist.compat.megatron_data import blended_builder_class
from mtp_dist.config import ConfigError
from mtp_dist.data.shards import DataError, Shard, resolve_shards, verify_indices

SPLITS = ("train", "valid", "test")


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
    megatron folds into its index-cache key (so a new tokenizer, or new shard content under the
    same paths, never hits an old cache)."""

    def __init__(self, vocab_size: int, eod: int, pad: int, identity_hash: str, data: str) -> None:
        self.vocab_size, self.eod, self.pad = vocab_size, eod, pad
        self.unique_identifiers = {
            "class": "mtp_dist tokenizer",
            "hash": identity_hash,
            "vocab_size": vocab_size,
            "eod": eod,
            "pad": pad,
            "data": data,
        }


class _FullWindow:
    """Mixin for GPTDataset: return the whole token window and a target mask."""

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        # GPTDataset pads a short window with self._pad_token_id (the tokenizer's pad id, or -1).
        text, _ = self._query_document_sample_shuffle_indices(idx)
        tokens = torch.from_numpy(np.asarray(text, dtype=np.int64))
        real = tokens != self._pad_token_id
        vocab = self.config.tokenizer.vocab_size
        # Cheap where the tokens are read anyway; catches a damaged .bin the .idx checks cannot.
        if real.any() and (tokens[real].max() >= vocab or tokens[real].min() < 0):
            bad = int(tokens[real & ((tokens >= vocab) | (tokens < 0))][0])
            raise DataError(
                f"shard {self.dataset_path}: sample {idx} holds token id {bad}, outside the "
                f"vocabulary [0, {vocab}): the shard is damaged or was made with another "
                "tokenizer; check it with `python -m data_prep verify "
                f"{os.path.dirname(self.dataset_path or '') or '.'}`"
            )
        fill = self.config.tokenizer.pad if self.config.tokenizer.pad >= 0 else 0
        return {"tokens": torch.where(real, tokens, fill), "loss_mask": real.float()}


class Samples(Dataset):
    """The top-level dataset handed to the trainer: items are exactly {"tokens", "loss_mask"}.
    Its length is one epoch; the sampler decides the order of the epochs after the first."""

    def __init__(self, inner, window: int) -> None:
        self.inner, self.window = inner, window

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        item = self.inner[idx]
        return {"tokens": item["tokens"], "loss_mask": item["loss_mask"]}


def _builder_classes():
    with warnings.catch_warnings():
        ignore_known_warnings()  # megatron-core's import notes that Apex/TE are absent
        from megatron.core.datasets.blended_dataset import BlendedDataset
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    class MTPGPTDataset(_FullWindow, GPTDataset):
        pass

    class MTPMockGPTDataset(_FullWindow, MockGPTDataset):
        pass

    builder = blended_builder_class()
    return MTPGPTDataset, MTPMockGPTDataset, BlendedDataset, builder, GPTDatasetConfig


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
    """(train, valid, test) datasets; a split is None when its num_samples is 0 (not needed).

    Real data is built for one pass over each split's tokens whatever num_samples says (so the
    order does not depend on the run's length; the sampler wraps into further epochs). Synthetic
    data (megatron-core's mock dataset) is built for num_samples.

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
    gpt_cls, mock_cls, blended_cls, builder_cls, GPTDatasetConfig = _builder_classes()
    common = dict(
        random_seed=seed,
        sequence_length=window - 1,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        add_extra_token_to_sequence=True,
    )
    if synthetic:
        tokenizer = _TokenizerIdentity(vocab_size, vocab_size - 1, -1, "", "synthetic")
        config = GPTDatasetConfig(blend=None, split=None, tokenizer=tokenizer, **common)
        sizes = [int(n) for n in num_samples]
        built = builder_cls(mock_cls, sizes, lambda: True, config).build()
        out = [None if ds is None or not sizes[i] else ds for i, ds in enumerate(built)]
    else:
        if not paths:
            raise DataError("no data paths given (or use synthetic data)")
        shards, tok = resolve_shards(paths, vocab_size, tokenizer_hash)
        verify_indices(shards)
        content = hashlib.sha256("".join(s.sidecar["sha256"] for s in shards).encode())
        tokenizer = _TokenizerIdentity(
            vocab_size, tok["eod_id"], tok["pad_id"], tok["hash"], content.hexdigest()
        )
        if cache_dir is None:
            cache_dir = os.path.join(os.path.dirname(shards[0].prefix), "index-cache")
        config = GPTDatasetConfig(
            blend=([s.prefix for s in shards], None),
            split=split,
            path_to_cache=cache_dir,
            tokenizer=tokenizer,
            **common,
        )
        splits = _Splits(shards, weights, config, gpt_cls, blended_cls, builder_cls)
        out = [splits.build(i) if num_samples[i] else None for i in range(len(SPLITS))]
    if out[0] is None:
        raise DataError(f"split {split!r} and num_samples {num_samples} leave no training data")
    return tuple(None if ds is None else Samples(ds, window) for ds in out)


class _Splits:
    """One split at a time: a GPTDataset per shard whose part of the split has documents, and a
    BlendedDataset over them (weighted as data.weights, or by tokens) when there are several."""

    def __init__(self, shards: list[Shard], weights, config, gpt_cls, blended_cls, builder_cls):
        self.shards, self.weights, self.config = shards, weights, config
        self.gpt_cls, self.blended_cls, self.builder_cls = gpt_cls, blended_cls, builder_cls
        self._low_level: dict[str, object] = {}

    def _build(self, cls, *args):
        return self.builder_cls.build_generic_dataset(cls, lambda: True, True, *args)

    def build(self, i: int):
        from megatron.core.datasets.utils import Split

        bounds = self.config.split_matrix[i]
        parts = [] if bounds is None else [(s, s.part(bounds)) for s in self.shards]
        parts = [(s, part, s.tokens(part)) for s, part in parts if len(part)]
        if not parts:
            documents = sum(s.documents for s in self.shards)
            raise DataError(
                f"the {SPLITS[i]} part of data.split={self.config.split!r} has no documents in "
                f"any of the {len(self.shards)} shards ({documents} documents): give it a larger "
                "share of data.split, or more data"
            )
        weights = self._blend_weights(parts)
        parts = [p for p, w in zip(parts, weights, strict=True) if w > 0]
        weights = [w for w in weights if w > 0]
        seq = self.config.sequence_length
        # One pass over the part's tokens: megatron's own count of one epoch's samples.
        size = max(1, (sum(tokens for _, _, tokens in parts) - 1) // seq)
        if len(parts) == 1:
            shard, part, _ = parts[0]
            return self._gpt(shard, part, size, Split(i))
        # As megatron's builder: each shard builds its share of the blend plus a small surplus.
        surplus = self.config.mid_level_dataset_surplus
        datasets = [
            self._gpt(shard, part, math.ceil(math.ceil(size * w) * (1 + surplus)), Split(i))
            for (shard, part, _), w in zip(parts, weights, strict=True)
        ]
        return self._build(self.blended_cls, datasets, weights, size, self.config)

    def _gpt(self, shard: Shard, part: range, num_samples: int, split):
        if shard.prefix not in self._low_level:
            self._low_level[shard.prefix] = self.gpt_cls.build_low_level_dataset(
                shard.prefix, self.config
            )
        indices = np.arange(part.start, part.stop, dtype=np.int32)
        low_level = self._low_level[shard.prefix]
        return self._build(
            self.gpt_cls, low_level, shard.prefix, indices, num_samples, split, self.config
        )

    def _blend_weights(self, parts) -> list[float]:
        """A data.paths entry's weight spread over its shards in this split by their tokens
        (without data.weights, every shard weighs its tokens); normalised. A path whose shards
        have no documents in this split drops out of it, and the others share its weight."""
        per_path: dict[int, int] = {}
        for shard, _, tokens in parts:
            per_path[shard.path] = per_path.get(shard.path, 0) + tokens
        raw = []
        for shard, _, tokens in parts:
            if self.weights is None:
                raw.append(float(tokens))
            else:
                raw.append(self.weights[shard.path] * tokens / per_path[shard.path])
        total = sum(raw)
        if total <= 0:
            raise DataError(f"data.weights {self.weights} leave no data in this split")
        return [w / total for w in raw]
