"""megatron-core's dataset builders: one private-API use and one bug workaround, every device.

- `IndexedDatasetBuilder.add_document` costs a numpy copy and a write per document, which
  dominates when documents are lines. `add_documents` writes a whole batch at once and extends
  the same private bookkeeping lists that `add_document` extends; `finalize` (the .idx writer)
  stays megatron-core's. tests/test_data_prep_formats.py checks that both give identical bytes.
- `BlendedDataset` calls torch.distributed.get_rank() on an index-cache miss, which raises
  without a process group: single-process runs build its (cheap, deterministic) index in
  memory instead. GPTDataset's own index cache is unaffected.
"""

from __future__ import annotations

import copy
import functools

import numpy as np

from mtp_dist.compat import Upstream, check

UPSTREAM = [
    Upstream(
        "megatron.core.datasets.indexed_dataset:IndexedDatasetBuilder.add_document",
        "self.sequence_lengths.extend(lengths)",
    ),
    Upstream(
        "megatron.core.datasets.indexed_dataset:IndexedDatasetBuilder.add_document",
        "self.document_indices.append(len(self.sequence_lengths))",
    ),
    Upstream(
        "megatron.core.datasets.blended_dataset:BlendedDataset",
        "torch.distributed.get_rank() == 0",
    ),
    Upstream(
        "megatron.core.datasets.blended_megatron_dataset_builder:"
        "BlendedMegatronDatasetBuilder.build_generic_dataset",
        "def build_generic_dataset(",
    ),
]


@functools.cache
def batched_builder_class():
    """megatron-core's IndexedDatasetBuilder plus `add_documents(tokens, lengths)`: many
    documents (tokens concatenated, one length each) in one write."""
    check(UPSTREAM[:2])
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    class BatchedIndexedDatasetBuilder(IndexedDatasetBuilder):
        def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
            self.data_file.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
            start = len(self.sequence_lengths)
            self.sequence_lengths.extend(lengths.tolist())
            self.document_indices.extend(range(start + 1, start + len(lengths) + 1))

    return BatchedIndexedDatasetBuilder


@functools.cache
def blended_builder_class():
    """BlendedMegatronDatasetBuilder that also works without a process group."""
    check(UPSTREAM[2:])
    import torch
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )

    class Builder(BlendedMegatronDatasetBuilder):
        @staticmethod
        def build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args):
            if cls is BlendedDataset and not torch.distributed.is_initialized():
                config = copy.copy(args[-1])
                config.path_to_cache = None
                return cls(*args[:-1], config)
            return BlendedMegatronDatasetBuilder.build_generic_dataset(
                cls, is_built_on_rank, synchronize_ranks, *args
            )

    return Builder
