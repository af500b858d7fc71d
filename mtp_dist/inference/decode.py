"""Greedy and self-speculative decoding, and sampling (sampling.py), with the training model's
own layers and a KV cache.

Self-speculative decoding with k heads (the paper's Section 3.2, after Stern et al. 2018): at
the last accepted position, heads 2..k draft the k-1 tokens after head 1's next token. One
forward of [that token, the drafts] through the trunk and the heads verifies them: head 1's
greedy token at each chunk position is what greedy decoding would produce there if the drafts
before it are right, so the longest prefix of drafts equal to head 1's tokens is accepted, plus
head 1's own token after it. The caches keep the accepted tokens (cache.KVCache.keep), and
heads 2..k, which ran over the same chunk, draft again from the last accepted position. The
output is greedy decoding's, token for token; each forward yields 1..k tokens.

Greedy decoding is the case k=1: a chunk of one token, no drafts. With a temperature > 0 the
same loop samples: a sampling.Sampler draws the tokens and drafts and decides which drafts to
accept (the speculative-sampling rule), where greedy (_Greedy) takes argmaxes and compares.

Logits are vocab-parallel [s, b, V/tp]; the greedy token is the argmax over the whole
vocabulary (a max and an index gathered over the tensor-parallel ranks), never a padding entry.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor

from mtp_dist.distributed import collective_device
from mtp_dist.inference.cache import KVCache
from mtp_dist.inference.packed_linear import packed_weights
from mtp_dist.inference.sampling import Sampler, Sampling, sequence_seed


def vocab_parallel_argmax(logits: Tensor, vocab_size: int) -> Tensor:
    """The index of the largest logit over the full vocabulary from vocab-parallel logits
    [..., V/tp], ignoring the padding entries (index >= vocab_size); ties go to the lowest
    index, as torch.argmax on the gathered logits. Collective over the tensor-parallel group."""
    shard = logits.shape[-1]
    rank = parallel_state.get_tensor_model_parallel_rank()
    first = rank * shard
    logits = logits.float()
    padding = first + shard - vocab_size
    if padding > 0:
        logits = logits.clone()
        logits[..., max(0, shard - padding) :] = float("-inf")
    local_max, local_idx = logits.max(dim=-1)
    global_idx = local_idx + first
    world = parallel_state.get_tensor_model_parallel_world_size()
    if world == 1:
        return global_idx
    group = parallel_state.get_tensor_model_parallel_group()
    device = collective_device(group)
    maxes = [torch.empty_like(local_max, device=device) for _ in range(world)]
    idxs = [torch.empty_like(global_idx, device=device) for _ in range(world)]
    dist.all_gather(maxes, local_max.to(device).contiguous(), group=group)
    dist.all_gather(idxs, global_idx.to(device).contiguous(), group=group)
    # argmax over ranks picks the first (lowest-index) rank among equal maxima.
    best = torch.stack(maxes).argmax(dim=0, keepdim=True)
    return torch.stack(idxs).gather(0, best).squeeze(0).to(logits.device)


@dataclass
class Generation:
    """One prompt's result."""

    tokens: list[int]
    """The new tokens (an end-of-sequence token included, if one ended it)."""
    finish_reason: str = ""
    """`eos`, or `length` (max_new_tokens or the model's seq_length reached)."""
    forwards: int = 0
    """Forwards of the model while this sequence was generating (the prompt's included)."""
    drafts_accepted: list[int] = field(default_factory=list)
    """Per drafting head (heads 2..k): in how many verifying forwards its draft was accepted."""
    verifications: int = 0
    """Forwards that verified drafts (every forward after the prompt's, with k >= 2)."""
    seconds: float = 0.0
    """Wall-clock time of the batch it was generated in."""

    @property
    def tokens_per_forward(self) -> float:
        return len(self.tokens) / max(1, self.forwards)

    @property
    def acceptance(self) -> list[float]:
        """Per drafting head (heads 2..k): the fraction of verifying forwards that accepted its
        draft (and so every draft before it)."""
        return [a / max(1, self.verifications) for a in self.drafts_accepted]


class Decoder:
    """Decoding with an MTPModel holding the whole model (one pipeline stage; any TP)."""

    def __init__(
        self, model, vocab_size: int, max_length: int | None = None, packed_weights: bool = True
    ):
        """vocab_size: the tokenizer's (the unembedding's padding is never chosen);
        max_length: the longest a sequence may grow, prompt included (default: the model's
        seq_length); packed_weights: on CPU, multiply by weights packed for oneDNN while
        generating (packed_linear.py; the same tokens, faster)."""
        assert model.pre_process and model.post_process, "decoding needs the whole model"
        self.model = model
        self.vocab_size = vocab_size
        self.max_length = max_length or model.seq_length
        self.device = next(model.parameters()).device
        self.packed_weights = packed_weights

    def _forward(self, tokens: Tensor, cache: KVCache, heads: int) -> list[Tensor]:
        """Tokens [b, c] after the cached ones, through the trunk and heads 0..heads-1 (each
        caching its keys and values): each head's normed hidden states [c, b, h]."""
        mask, rope = cache.chunk_inputs(tokens.shape[1])
        model, context = self.model, cache.context
        x = model.embedding(input_ids=tokens, position_ids=None)
        h = model.trunk(
            hidden_states=x, attention_mask=mask, rotary_pos_emb=rope, inference_context=context
        )
        return [model.heads.hidden(i, h, mask, rope, context) for i in range(heads)]

    def _greedy(self, hidden: list[Tensor]) -> Tensor:
        """Greedy tokens [heads, s, b] of the heads' normed hidden states (each [s, b, h]), with
        one unembedding for all (at small batches, reading its weight is what costs)."""
        stacked = torch.stack(hidden)
        logits = self.model.unembed(stacked.flatten(0, 1))
        return vocab_parallel_argmax(logits, self.vocab_size).view(stacked.shape[:3])

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        k: int = 1,
        eos_id: int | None = None,
        sampling: Sampling | None = None,
        samples: list[int] | None = None,
    ) -> list[Generation]:
        """Continuations of a batch of prompts (token ids), with self-speculative decoding over
        heads 1..k if k >= 2 (k <= the model's n). Greedy unless `sampling` has a temperature
        > 0; then samples[i] (default 0) is prompt i's sample index, which with the seed and
        the prompt seeds its random stream (sampling.py)."""
        start = time.perf_counter()
        if sampling is None or sampling.greedy:
            chooser = _Greedy(self, k)
        else:
            samples = samples or [0] * len(prompts)
            pairs = zip(prompts, samples, strict=True)
            seeds = [sequence_seed(sampling.seed, p, i) for p, i in pairs]
            chooser = Sampler(self.model.unembed, self.vocab_size, sampling, seeds, k)
        with packed_weights(self.model, self.packed_weights):
            results = self._generate(prompts, max_new_tokens, k, eos_id, chooser)
        seconds = time.perf_counter() - start
        for r in results:
            r.seconds = seconds
        return results

    def _generate(
        self, prompts: list[list[int]], max_new_tokens: int, k: int, eos_id: int | None, chooser
    ) -> list[Generation]:
        n = self.model.n_future_tokens
        assert 1 <= k <= n, f"k={k} must be in 1..n={n}"
        assert all(0 < len(p) < self.max_length for p in prompts), "prompt lengths"
        self.model.eval()
        batch = len(prompts)
        results = [Generation([], drafts_accepted=[0] * (k - 1)) for _ in prompts]
        limits = [min(len(p) + max_new_tokens, self.max_length) for p in prompts]
        if max_new_tokens <= 0:
            return results
        cache = KVCache(self.model, batch, max(limits) + k, self.device)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        padded = torch.zeros(batch, int(lengths.max()), dtype=torch.long, device=self.device)
        for b, p in enumerate(prompts):
            padded[b, : len(p)] = torch.tensor(p, dtype=torch.long)
        rows = torch.arange(batch, device=self.device)

        hidden = self._forward(padded, cache, k)
        cache.keep(lengths)
        # Every head at each prompt's last position: head 1's token, heads 2..k's drafts.
        guesses = chooser.start([hs[lengths - 1, rows] for hs in hidden]).to(self.device)
        ongoing = []
        for b in range(batch):
            results[b].forwards += 1
            first = [int(guesses[b, 0])]
            ongoing.append(self._commit(results[b], first, limits[b], len(prompts[b]), eos_id))
        index = list(range(batch))  # batch row -> prompt: finished sequences leave the batch
        while True:
            guesses, index = self._drop_finished(cache, chooser, guesses, index, ongoing)
            if not index:
                break
            chunk = guesses  # [b, k]: the last token (head 1's), then the drafts
            hidden = self._forward(chunk, cache, k)
            accepted, guesses = chooser.verify(chunk, hidden)
            cache.keep(accepted + 1)
            ongoing = []
            for row, b in enumerate(index):
                r, a = results[b], int(accepted[row])
                r.forwards += 1
                r.verifications += int(k > 1)
                for j in range(a):
                    r.drafts_accepted[j] += 1
                new = chunk[row, 1 : 1 + a].tolist() + [int(guesses[row, 0])]
                ongoing.append(self._commit(r, new, limits[b], len(prompts[b]), eos_id))
        return results

    @staticmethod
    def _drop_finished(
        cache: KVCache, chooser, guesses: Tensor, index: list[int], ongoing: list[bool]
    ) -> tuple[Tensor, list[int]]:
        """The batch without its finished rows (their compute would be wasted)."""
        if all(ongoing):
            return guesses, index
        keep = [row for row, going in enumerate(ongoing) if going]
        selected = torch.tensor(keep, dtype=torch.long, device=guesses.device)
        cache.select(selected)
        chooser.select(keep)
        return guesses[selected], [index[row] for row in keep]

    @staticmethod
    def _commit(
        result: Generation, new: list[int], limit: int, prompt_length: int, eos_id: int | None
    ) -> bool:
        """Append new tokens up to an end-of-sequence token or the length limit; False when
        the sequence is finished."""
        for token in new:
            result.tokens.append(token)
            if token == eos_id:
                result.finish_reason = "eos"
                return False
            if prompt_length + len(result.tokens) >= limit:
                result.finish_reason = "length"
                return False
        return True


class _Greedy:
    """The decoder's token choice without sampling (sampling.Sampler's interface): head 1's
    argmax, heads 2..k's argmax drafts; a draft is accepted if it is head 1's token."""

    def __init__(self, decoder: Decoder, k: int):
        self.decoder, self.k = decoder, k

    def select(self, rows: list[int]) -> None:
        pass

    def start(self, last: list[Tensor]) -> Tensor:
        return self.decoder._greedy([h[None] for h in last])[:, 0].T

    def verify(self, chunk: Tensor, hidden: list[Tensor]) -> tuple[Tensor, Tensor]:
        rows = torch.arange(chunk.shape[0], device=chunk.device)
        verified = self.decoder._greedy(hidden[:1])[0].T  # [b, k]: head 1 after each token
        agree = (chunk[:, 1:] == verified[:, :-1]).long().cumprod(dim=1)
        accepted = agree.sum(dim=1)  # [b]: drafts accepted
        # Head 1's token after the last accepted one, and the drafts from that position.
        guesses = verified[rows, accepted][:, None]
        if self.k > 1:
            drafts = self.decoder._greedy([hs[accepted, rows][None] for hs in hidden[1:]])[:, 0]
            guesses = torch.cat([guesses, drafts.T], dim=1)
        return accepted, guesses


@torch.no_grad()
def recompute_greedy(
    model, prompt: list[int], max_new_tokens: int, vocab_size: int, eos_id: int | None = None
) -> list[int]:
    """Greedy decoding without a cache: every step runs the whole prefix through the model
    (the reference the cached decoders must equal)."""
    model.eval()
    device = next(model.parameters()).device
    tokens = list(prompt)
    limit = min(len(prompt) + max_new_tokens, model.seq_length)
    while len(tokens) < limit:
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        (logits,) = model.head_logits(ids, heads=[0])
        token = int(vocab_parallel_argmax(logits[-1, 0], vocab_size))
        tokens.append(token)
        if token == eos_id:
            break
    return tokens[len(prompt) :]
