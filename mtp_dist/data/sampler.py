"""Deterministic, resumable batching of a map-style dataset for data-parallel training.

Global batch g covers dataset indices [consumed + g*G, consumed + (g+1)*G). DP rank r takes the
contiguous slice of G/dp_size samples at offset r*G/dp_size and splits it into microbatches.
The union over ranks is therefore the single-rank sequence, in order, whatever the layout; and
resuming needs nothing but the count of consumed samples.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch


def microbatches(
    dataset,
    micro_batch_size: int,
    global_batch_size: int,
    dp_rank: int,
    dp_size: int,
    consumed_samples: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless iterator of collated microbatches {"tokens": [mb, S], "loss_mask": [mb, S]}."""
    if global_batch_size % (micro_batch_size * dp_size) != 0:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not a multiple of micro_batch_size "
            f"{micro_batch_size} x dp_size {dp_size}"
        )
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} not in [0, dp_size {dp_size})")
    per_rank = global_batch_size // dp_size
    for g in itertools.count():
        start = consumed_samples + g * global_batch_size + dp_rank * per_rank
        for m in range(0, per_rank, micro_batch_size):
            first = start + m
            last = first + micro_batch_size - 1
            if last >= len(dataset):
                raise IndexError(
                    f"sample {last} requested but the dataset has {len(dataset)} samples: "
                    "build it with num_samples covering every step of the run"
                )
            yield collate([dataset[i] for i in range(first, last + 1)])


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}
