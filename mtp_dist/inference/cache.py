"""The KV cache of generation: megatron-core's StaticInferenceContext, which caches the keys and
values of every trunk layer and every head layer (each under its own layer number), plus a
valid length per sequence, so that each sequence of a batch accepts its own number of tokens.

Layout: sequence b's tokens 0..lengths[b]-1 sit in the cache slots of the same index. A forward
writes its chunk of c tokens at the slots [offset, offset + c) shared by the batch (offset: the
longest valid length); in row b the chunk's tokens take the positions lengths[b] ..
lengths[b] + c - 1 (a rotary embedding per row), and the attention mask hides row b's stale
slots [lengths[b], offset). `keep` then moves the chunk tokens a row keeps down to its valid
length, so rolling back rejected drafts costs nothing: their slots are simply overwritten later.
The attention applies the rotary embedding to the cached keys at every forward (megatron-core
caches keys before rotation), so a moved key takes its new position's rotation.
"""

from __future__ import annotations

import torch
from megatron.core.inference.contexts import StaticInferenceContext
from torch import Tensor


class KVCache:
    def __init__(self, model, batch: int, max_length: int, device: torch.device):
        """model: an MTPModel (its rotary embedding); max_length: the most slots a forward may
        reach (the longest sequence plus one chunk)."""
        self.context = StaticInferenceContext(batch, max_length)
        self.max_length = max_length
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        """Per sequence: how many of its tokens the cache holds (slots 0..length-1)."""
        self.rope_table = model.rotary_pos_emb(max_length)[:, 0, 0]  # [max_length, d]
        self._chunk_offset: int | None = None

    @property
    def offset(self) -> int:
        return int(self.lengths.max())

    def chunk_inputs(self, c: int) -> tuple[Tensor, Tensor]:
        """The attention mask [b, 1, c, offset + c] (True: hidden) and the rotary embedding
        [offset + c, b, 1, d] of the next forward of c tokens per sequence; points the context
        at the chunk's slots."""
        offset = self.offset
        end = offset + c
        if end > self.max_length:
            raise ValueError(f"the KV cache holds {self.max_length} slots; {end} are needed")
        device = self.lengths.device
        slots = torch.arange(end, device=device)
        lengths = self.lengths[:, None]
        # Slot -> position, per row: the valid slots keep theirs, the chunk follows the row's
        # valid tokens (stale slots get any position: they are masked).
        positions = torch.where(
            slots[:, None] < offset, slots[:, None], lengths.T + slots[:, None] - offset
        )
        rope = self.rope_table[positions].unsqueeze(2)
        query = torch.arange(c, device=device)[:, None]
        in_chunk = (slots >= offset) & (slots <= offset + query)  # [c, end]: causal in the chunk
        valid = slots[None, None, :] < self.lengths[:, None, None]  # [b, 1, end]
        mask = ~(valid | in_chunk[None])
        self.context.sequence_len_offset = offset
        self._chunk_offset = offset
        return mask.unsqueeze(1), rope

    @torch.no_grad()
    def keep(self, counts: Tensor) -> None:
        """After a forward: row b keeps the first counts[b] tokens of the chunk (moved down to
        its valid length if stale slots lie in between); the rest of the chunk is dropped."""
        offset, self._chunk_offset = self._chunk_offset, None
        assert offset is not None, "keep() follows a forward of chunk_inputs()"
        counts = counts.to(self.lengths.device)
        # All rows' moves at once, as (slot, row) pairs: one gather-scatter per cache tensor.
        moved = (self.lengths != offset) & (counts > 0)
        n = counts[moved]
        rows = torch.repeat_interleave(torch.nonzero(moved).flatten(), n)
        if len(rows):
            first = torch.repeat_interleave(torch.cumsum(n, 0) - n, n)  # each row's first pair
            within = torch.arange(len(rows), device=rows.device) - first  # 0..n-1 in its row
            source, target = offset + within, self.lengths[rows] + within
            for memory in self.context.key_value_memory_dict.values():
                for cache in memory:
                    cache[target, rows] = cache[source, rows]
        self.lengths += counts

    @torch.no_grad()
    def select(self, rows: Tensor) -> None:
        """Keep only these batch rows (in this order) as rows 0..len(rows)-1."""
        for memory in self.context.key_value_memory_dict.values():
            for cache in memory:
                cache[:, : len(rows)] = cache[:, rows].clone()
        self.lengths = self.lengths[rows.to(self.lengths.device)]
