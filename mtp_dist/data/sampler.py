"""Deterministic, resumable batching of a map-style dataset for data-parallel training.

The run draws samples k = 0, 1, 2, ... in order. Global batch g covers k in
[consumed + g*G, consumed + (g+1)*G); DP rank r takes the contiguous slice of G/dp_size samples
at offset r*G/dp_size and splits it into microbatches. The union over ranks is therefore the
single-rank sequence, in order, whatever the layout; and resuming needs nothing but the count
of consumed samples.

The dataset is one epoch (N samples, already shuffled by megatron-core). Sample k is item
k mod N of epoch k // N: the first epoch in the dataset's order, every later one in an order of
its own, (a*i + b) mod N with a coprime to N and (a, b) drawn from (seed, epoch): a bijection
computed in O(1), with no per-epoch index in memory. So the sequence goes on for as long as the
run does, and extending a run (a larger train.steps) draws the same first samples.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator

import numpy as np
import torch


@functools.lru_cache(maxsize=64)
def epoch_order(size: int, seed: int, epoch: int) -> tuple[int, int]:
    """(a, b) of epoch `epoch`'s order i -> (a*i + b) mod size; epoch 0 keeps the dataset's."""
    if epoch == 0 or size == 1:
        return 1, 0
    rng = np.random.default_rng([seed, epoch])
    b = int(rng.integers(size))
    while True:  # numbers coprime to N are common: a few draws
        a = int(rng.integers(1, size))
        if math.gcd(a, size) == 1:
            return a, b


def sample_index(k: int, size: int, seed: int) -> int:
    """The dataset item that the run's k-th sample is."""
    epoch, i = divmod(k, size)
    a, b = epoch_order(size, seed, epoch)
    return (a * i + b) % size


def microbatches(
    dataset,
    micro_batch_size: int,
    global_batch_size: int,
    dp_rank: int,
    dp_size: int,
    consumed_samples: int,
    seed: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless iterator of collated microbatches {"tokens": [mb, S], "loss_mask": [mb, S]}."""
    if global_batch_size % (micro_batch_size * dp_size) != 0:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not a multiple of micro_batch_size "
            f"{micro_batch_size} x dp_size {dp_size}"
        )
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} not in [0, dp_size {dp_size})")
    size = len(dataset)
    if size == 0:
        raise ValueError("the dataset is empty")
    per_rank = global_batch_size // dp_size
    for g in itertools.count():
        start = consumed_samples + g * global_batch_size + dp_rank * per_rank
        for m in range(0, per_rank, micro_batch_size):
            first = start + m
            ks = range(first, first + micro_batch_size)
            yield collate([dataset[sample_index(k, size, seed)] for k in ks])


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}
