"""Training data: megatron-core GPT datasets over data_prep's shards, and DP batching."""

from mtp_dist.data.dataset import (
    TokenizerMismatchError,
    build_datasets,
    configured_tokenizer_hash,
    data_identity,
)
from mtp_dist.data.sampler import microbatches

__all__ = [
    "build_datasets",
    "configured_tokenizer_hash",
    "data_identity",
    "microbatches",
    "TokenizerMismatchError",
]
