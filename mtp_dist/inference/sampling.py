"""Sampling for generation: tempered, truncated (top-k, top-p) distributions, one random stream
per sequence, and self-speculative sampling that keeps head 1's distribution exactly.

Reproducibility: each sequence draws from its own torch.Generator, seeded from (the seed, the
prompt's token ids, the sample index) by sequence_seed, and consumes a fixed number of uniforms
per forward whatever happens in it (K at the prompt's forward with K heads, then 2K-1 per
verifying forward; K=1, plain sampling: one per token). Draws are an inverse-CDF lookup in
float64 on CPU over the full vocabulary, gathered from the vocab-parallel logits, so that every
tensor-parallel rank draws the same token and the result does not depend on the TP layout, on
--batch or on the other sequences of a batch (up to the floating-point differences of the logits
themselves, which can move a draw only when its uniform falls within rounding of a boundary of
the cumulative distribution).

Self-speculative sampling (Leviathan et al. 2023, Chen et al. 2023) with heads 2..K as the
drafter: from the last accepted position, head j+1 proposes token j after the next one from its
own tempered, truncated distribution q_j (independent of the other drafts, which the rule
allows); one forward verifies: draft j is accepted with probability min(1, p_j/q_j) where p_j is
head 1's distribution at that position, and the first rejected one is replaced by a draw from
the normalised max(0, p_j - q_j); if every draft is accepted, head 1's distribution after the
last one gives one more token. Each emitted token then follows head 1's distribution exactly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor

from mtp_dist.distributed import collective_device


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    """0: greedy (the decoder's argmax path); > 0: sample from softmax(logits / temperature)."""
    top_k: int = 0
    """Keep the k most likely tokens (0: all; tokens tied with the k-th stay too)."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability reaches top_p (1: all)."""
    seed: int = 0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0: no top-k)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sequence_seed(seed: int, prompt: list[int], sample: int) -> int:
    """The seed of one sequence's random stream: a hash of the seed, the prompt's token ids and
    the sample index (so two equal prompts with the same index draw the same tokens)."""
    text = f"{seed}|{sample}|{','.join(map(str, prompt))}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & (2**63 - 1)


def gather_vocab(logits: Tensor, vocab_size: int) -> Tensor:
    """Full logits [..., vocab_size] (float64, CPU) from vocab-parallel logits [..., V/tp],
    identical on every tensor-parallel rank; the vocabulary's padding is dropped. Collective
    over the tensor-parallel group."""
    world = parallel_state.get_tensor_model_parallel_world_size()
    if world > 1:
        group = parallel_state.get_tensor_model_parallel_group()
        device = collective_device(group)
        local = logits.to(device).contiguous()
        shards = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(shards, local, group=group)
        logits = torch.cat(shards, dim=-1)
    return logits[..., :vocab_size].to("cpu", torch.float64)


def probabilities(logits: Tensor, s: Sampling) -> Tensor:
    """The tempered, truncated distribution [..., V] of full logits [..., V]."""
    logits = logits / s.temperature
    if s.top_k and s.top_k < logits.shape[-1]:
        kth = logits.topk(s.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep a token if the tokens more likely than it hold less than top_p: the smallest
        # prefix that reaches top_p (the most likely token always stays).
        before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= s.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draw(probs: Tensor, uniforms: Tensor) -> Tensor:
    """Tokens [...] from distributions [..., V] by inverse CDF, one uniform in [0, 1) each
    (never a token of probability 0)."""
    cdf = probs.cumsum(-1)
    target = (uniforms * cdf[..., -1]).unsqueeze(-1)
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    # u * total can round up to total: the last token of positive probability then.
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).long().argmax(-1)
    return torch.minimum(tokens, last)


class Sampler:
    """The decoder's token choice when sampling (decode.Decoder takes it in place of greedy's):
    start() after the prompt's forward, verify() after each forward of a chunk."""

    def __init__(self, unembed, vocab_size: int, sampling: Sampling, seeds: list[int], k: int):
        self.unembed, self.vocab_size, self.sampling, self.k = unembed, vocab_size, sampling, k
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.drafts_q: Tensor | None = None  # [b, k-1, V]: the pending drafts' distributions

    def _probs(self, hidden: Tensor) -> Tensor:
        """Distributions [..., b, V] of normed hidden states [..., b, h]."""
        shape = hidden.shape[:-1]
        logits = self.unembed(hidden.reshape(-1, 1, hidden.shape[-1]))
        full = gather_vocab(logits, self.vocab_size)
        return probabilities(full.view(*shape, self.vocab_size), self.sampling)

    def _uniforms(self, n: int) -> Tensor:
        """[b, n]: the next n uniforms of every sequence's own stream."""
        return torch.stack(
            [torch.rand(n, generator=g, dtype=torch.float64) for g in self.generators]
        )

    def select(self, rows: list[int]) -> None:
        self.generators = [self.generators[r] for r in rows]
        if self.drafts_q is not None:
            self.drafts_q = self.drafts_q[rows]

    def start(self, last: list[Tensor]) -> Tensor:
        """last: each head's (1..k) hidden state [b, h] at each prompt's last position. Returns
        [b, k]: head 1's drawn token, then heads 2..k's drafts."""
        probs = self._probs(torch.stack(last)).transpose(0, 1)  # [b, k, V]
        u = self._uniforms(self.k)
        self.drafts_q = probs[:, 1:]
        return draw(probs, u)

    def verify(self, chunk: Tensor, hidden: list[Tensor]) -> tuple[Tensor, Tensor]:
        """chunk [b, k]: the last token and the drafts; hidden: each head's hidden states
        [k, b, h] over the chunk. Returns the drafts accepted [b] and the next chunk [b, k]."""
        b, k = chunk.shape
        u = self._uniforms(2 * k - 1)  # k-1 acceptance tests, 1 token, k-1 new drafts
        p = self._probs(hidden[0]).transpose(0, 1)  # [b, k, V]: head 1 after each chunk token
        rows = torch.arange(b)
        accepted = torch.zeros(b, dtype=torch.long)
        if k > 1:
            drafts = chunk[:, 1:].cpu()
            q = self.drafts_q
            p_d = p[:, :-1].gather(-1, drafts[..., None]).squeeze(-1)
            q_d = q.gather(-1, drafts[..., None]).squeeze(-1)
            accepted = self.accept(u[:, : k - 1], p_d, q_d).long().cumprod(1).sum(1)
        # Head 1's distribution at the first rejected draft's position, less the draft's; or
        # after the last draft when all were accepted.
        final = p[rows, accepted]
        if k > 1:
            rejected = accepted < k - 1
            residual = self.rejected(final, q[rows, accepted.clamp(max=k - 2)])
            final = torch.where(rejected[:, None], residual, final)
        token = draw(final, u[:, k - 1])
        guesses = token[:, None]
        if k > 1:
            at = accepted.to(hidden[1].device)
            last = torch.stack([hs[at, torch.arange(b, device=at.device)] for hs in hidden[1:]])
            self.drafts_q = self._probs(last).transpose(0, 1)  # [b, k-1, V]
            guesses = torch.cat([guesses, draw(self.drafts_q, u[:, k:])], dim=1)
        return accepted, guesses.to(chunk.device)

    @staticmethod
    def accept(u: Tensor, p: Tensor, q: Tensor) -> Tensor:
        """Accept a draft of proposal probability q > 0 with probability min(1, p/q)."""
        return u * q < p

    @staticmethod
    def rejected(p: Tensor, q: Tensor) -> Tensor:
        """The distribution of the token that replaces a rejected draft: max(0, p - q),
        normalised (p itself where p <= q everywhere up to rounding; a rejection then has
        probability 0)."""
        residual = (p - q).clamp(min=0)
        total = residual.sum(-1, keepdim=True)
        return torch.where(total > 0, residual / total.clamp(min=1e-300), p)
