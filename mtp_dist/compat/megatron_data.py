"""megatron-core's dataset builders: one bug workaround, every device.

`BlendedDataset` calls torch.distributed.get_rank() on an index-cache miss, which raises without
a process group: single-process runs build its (cheap, deterministic) index in memory instead.
GPTDataset's own index cache is unaffected.

(The .bin/.idx shards are written by data_prep.shard_index, without megatron-core.)
"""

from __future__ import annotations

import copy
import functools

from mtp_dist.compat import Upstream, check

UPSTREAM = [
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
def blended_builder_class():
    """BlendedMegatronDatasetBuilder that also works without a process group."""
    check(UPSTREAM)
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
