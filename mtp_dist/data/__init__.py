"""Training data: megatron-core GPT datasets over data_prep's shards, and DP batching."""

from mtp_dist.data.dataset import build_datasets, configured_tokenizer_hash
from mtp_dist.data.sampler import microbatches
from mtp_dist.data.shards import DataError, TokenizerMismatchError, data_identity

__all__ = [
    "build_datasets",
    "configured_tokenizer_hash",
    "data_identity",
    "microbatches",
    "DataError",
    "TokenizerMismatchError",
]
