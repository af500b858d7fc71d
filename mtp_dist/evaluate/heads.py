"""Per-head quality on held-out data, teacher-forced: each head's loss and top-1 accuracy, and
the self-speculative acceptance each drafting head would get, from one forward per window.

Windows. The shards' documents, in shard order, are packed across their end-of-document tokens
(as training packs them) and cut into consecutive, non-overlapping windows of seq_length + n
tokens: the inputs are the first seq_length, and head i has a real target at every input
position. `split` "all" takes every document (a directory training never read); "valid" or
"test" takes that part of each shard under the model's data.split, the documents training held
out of its training split (the same documents its validation reads, not its shuffled order).

Loss and accuracy. Head i (1-based) at position t predicts token t+i: its mean cross-entropy
over the window's positions (over the padded vocabulary, as training's validation loss), and
the fraction of positions where its argmax (over the real vocabulary, as the decoder's) is the
data's token t+i.

Acceptance, as the greedy decoder decides it (inference/decode.py). Let g[t] be head 1's argmax
at position t and d_k[t] head k's. A verifying forward at last-accepted position p checks head
k's draft d_k[p] (token p+k) against head 1's greedy token at position p+k-1, and a draft counts
only if every earlier draft of the same forward was accepted. Teacher-forced, draft k at
position t is therefore accepted when

    d_j[t] == g[t + j - 1]   for every j in 2..k,

wherever all n-1 drafts have a target inside the window (t <= seq_length - n). The decoder
does not verify at every position: after a forward at p that accepts a drafts it verifies next
at p + a + 1. Where acceptance comes in runs (a stretch of easy text: long jumps, few forwards;
a hard one: a forward per token) the rate per forward is lower than the rate per position, so
the acceptance reported is the decoder's walk, replayed on the teacher-forced events: for each
K, from the window's first position, p -> p + a_K(p) + 1 with a_K(p) the drafts of heads 2..K
accepted at p, counting forwards and accepted drafts. Head k's `acceptance` is the fraction of
the walk's forwards (K = n) that accepted its draft and every earlier one, which is the
decoder's per-head acceptance (Generation.acceptance), and

    tokens per forward (K) = 1 + (accepted drafts of the K walk) / (its forwards),

the decoder's tokens per verifying forward. `acceptance_any_position` is the same event's rate
over every position (higher than `acceptance` by as much as acceptance is clustered).

Which tokens it conditions on. Here head 1's g[t + j - 1] sees the data's tokens up to t+j-1,
where the decoder's head 1 sees its own greedy tokens. The two are the same when the sequence
is the model's own greedy text: over `prompt + greedy continuation`, g[t] is the next token of
the sequence, so the walk from the prompt's last position is the decoder's run, forward by
forward (tests/test_evaluate_heads.py gets the decoder's counts exactly, and the rates on one
set of prompts predict the decoder's on another within sampling noise). On held-out data the
numbers are for text like the data; the decoder, continuing with its own and usually more
predictable greedy text, tends to accept more (the tests measure both). To predict what
`generate --speculative` gets on prompts like the data's, `--prompt P`
(tally_greedy_acceptance) takes each window's first P tokens as a prompt, continues it greedily
to the model's context, and walks the teacher-forced events of that text from the prompt's last
position: the decoder's run, up to its last few forwards, for one greedy generation and one
forward per window; loss and accuracy stay the data's.

With `--temperature T` (and --top-k/--top-p/--seed) the same is done for self-speculative
sampling (tally_sampled_acceptance): the prompt is continued by plain sampling, and a draft is
accepted with the probability the speculative-sampling rule gives it, sum_x min(p(x), q(x))
(head 1's and the drafting head's tempered, truncated distributions), drawn 32 times per
position and walked as above. Greedy is the limit T -> 0 (the tests check both).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mtp_dist.errors import UserError

SPLITS = ("all", "valid", "test")


def held_out_windows(
    data: Path, split: str, split_spec: str, vocab_size: int, tokenizer_hash: str, window: int
) -> Iterator[np.ndarray]:
    """Windows [window] (int64) of the shards under `data` (see the module's docstring); the
    shards checked as training checks them, and refused if made with another tokenizer."""
    from mtp_dist.data.shards import (
        DataError,
        TokenizerMismatchError,
        resolve_shards,
        verify_indices,
    )

    if not data.is_dir():
        raise UserError(f"--data {data}: not a directory: give a directory of tokenized shards")
    try:
        shards, tokenizer = resolve_shards([str(data)], vocab_size, None)
    except TokenizerMismatchError as e:
        raise UserError(f"--data {data}: not tokenized with the model's tokenizer: {e}") from e
    if tokenizer["hash"] != tokenizer_hash:
        raise UserError(
            f"--data {data} was tokenized with another tokenizer ({tokenizer['hash'][:12]}) than "
            f"the model's ({tokenizer_hash[:12]}): give shards made with the model's tokenizer "
            "(or the tokenizer the shards were made with, if it is the model's, with --tokenizer)"
        )
    verify_indices(shards)
    bounds = (0.0, 1.0)
    if split != "all":
        bounds = split_bounds(split_spec)[SPLITS.index(split)]  # "all" stands where "train" is
        if bounds is None:
            raise DataError(f"data.split {split_spec!r} gives the {split} split nothing")
    pending = np.zeros(0, dtype=np.int64)
    for shard in shards:
        part = shard.part(bounds)
        if not len(part):
            continue
        index = shard.index
        first = int(index.pointers[part.start]) // index.dtype.itemsize
        tokens = np.memmap(shard.prefix + ".bin", dtype=index.dtype, mode="r")
        tokens = tokens[first : first + shard.tokens(part)]
        step = window * 64  # read a shard a piece at a time: --max-windows stops early
        for start in range(0, len(tokens), step):
            pending = np.concatenate([pending, tokens[start : start + step].astype(np.int64)])
            while len(pending) >= window:
                yield pending[:window]
                pending = pending[window:]


def split_bounds(spec: str) -> list[tuple[float, float] | None]:
    """The (train, valid, test) document fractions of a data.split, as megatron-core's."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
    )

    from mtp_dist.config import parse_split

    parts = parse_split(spec)
    return convert_split_vector_to_split_matrix([x / sum(parts) for x in parts])


@dataclass
class Tally:
    """Sums over windows; `summary` turns them into rates."""

    n: int
    windows: int = 0
    loss: list[float] = field(default_factory=list)
    correct: list[int] = field(default_factory=list)
    targets: int = 0
    """Positions per head (the same for every head)."""
    accepted: list[int] = field(default_factory=list)
    """Per drafting head (2..n), over every draft position: drafts accepted with all earlier."""
    draft_positions: int = 0
    walks: dict = field(default_factory=dict)
    """K -> [verifications, accepted drafts of heads 2..K] of the decoder's walk (walk())."""

    def __post_init__(self):
        self.loss = self.loss or [0.0] * self.n
        self.correct = self.correct or [0] * self.n
        self.accepted = self.accepted or [0] * (self.n - 1)
        self.walks = self.walks or {k: [0, [0] * (k - 1)] for k in range(2, self.n + 1)}

    def add_acceptance(self, accepted: Tensor, start: int = 0) -> None:
        """accepted_drafts() of some sequences; the decoder's walks start at position `start`."""
        self.draft_positions += accepted.shape[1] * accepted.shape[2]
        for k in range(self.n - 1):
            self.accepted[k] += int(accepted[k].sum())
        for K, (verifications, counts) in self.walks.items():
            v, c = walk(accepted, K, start)
            self.walks[K] = [verifications + v, [a + b for a, b in zip(counts, c, strict=True)]]

    def summary(self) -> dict:
        heads = []
        full = self.walks.get(self.n)
        for i in range(self.n):
            head = {
                "head": i + 1,
                "loss": round(self.loss[i] / max(1, self.targets), 4),
                "accuracy": round(self.correct[i] / max(1, self.targets), 4),
            }
            if i:
                head["acceptance"] = round(full[1][i - 1] / max(1, full[0]), 4)
                head["acceptance_any_position"] = round(
                    self.accepted[i - 1] / max(1, self.draft_positions), 4
                )
            heads.append(head)
        per_forward = {str(k): round(1 + sum(c) / max(1, v), 4) for k, (v, c) in self.walks.items()}
        return {
            "windows": self.windows,
            "positions": self.targets,
            "verifications": full[0] if full else 0,
            "heads": heads,
            "tokens_per_forward": per_forward,
        }


def walk(accepted: Tensor, K: int, start: int = 0) -> tuple[int, list[int]]:
    """The decoder's verifying forwards with heads 1..K over each sequence of accepted_drafts()
    [n-1, positions, b]: the first at `start`, each next one after the drafts it accepted and
    head 1's token (p -> p + accepted + 1), while the drafts' targets are in the sequence.
    (verifications, accepted drafts of heads 2..K)."""
    leading = accepted[: K - 1].sum(dim=0).T.tolist()  # [b][positions]: drafts accepted at p
    verifications, counts = 0, [0] * (K - 1)
    for row in leading:
        p = start
        while p < len(row):
            a = row[p]
            verifications += 1
            for k in range(a):
                counts[k] += 1
            p += a + 1
    return verifications, counts


def accepted_drafts(argmax: Tensor) -> Tensor:
    """Teacher-forced acceptance (the module's docstring) from every head's argmax [n, s, b]:
    bool [n-1, s-n+1, b], entry (k-2, t) true when head k's draft at t is accepted with every
    earlier draft of the same forward."""
    n, s, _ = argmax.shape
    positions = s - n + 1
    g = argmax[0]
    agree = [argmax[j - 1, :positions] == g[j - 1 : j - 1 + positions] for j in range(2, n + 1)]
    return torch.stack(agree).long().cumprod(dim=0).bool()


@torch.no_grad()
def tally_windows(
    model, windows: Tensor, vocab_size: int, tally: Tally, acceptance: bool = True
) -> None:
    """Add windows [b, seq_length + n] to the tally: one forward of the trunk, then each head
    in turn (one head's logits alive at a time); acceptance on the windows' tokens unless
    told not to (tally_greedy_acceptance gives it instead)."""
    from megatron.core import tensor_parallel

    from mtp_dist.inference.decode import vocab_parallel_argmax
    from mtp_dist.model.heads import head_targets

    n, s = tally.n, windows.shape[1] - tally.n
    model.eval()
    windows = windows.to(next(model.parameters()).device)
    inputs = windows[:, :s]
    h = model.trunk_forward(inputs)
    mask, rope = model._positions(s, inputs.device)
    targets, _ = head_targets(windows, None, s, n)  # [n, s, b]
    argmax = []
    for i in range(n):
        logits = model.unembed(model.heads.hidden(i, h, mask, rope))
        ce = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), targets[i])
        tally.loss[i] += float(ce.double().sum())
        argmax.append(vocab_parallel_argmax(logits, vocab_size))
        tally.correct[i] += int((argmax[-1] == targets[i]).sum())
        del logits
    if acceptance and n > 1:  # a model with one head drafts nothing
        tally.add_acceptance(accepted_drafts(torch.stack(argmax)))
    tally.windows += windows.shape[0]
    tally.targets += s * windows.shape[0]


@torch.no_grad()
def tally_greedy_acceptance(model, decoder, windows: Tensor, prompt: int, vocab_size: int, tally):
    """Acceptance conditioned on the model's own greedy text: each window's first `prompt`
    tokens continued greedily to the model's seq_length, every head's argmax over that
    sequence, and the decoder's walks from the prompt's last position (the decoder's run on
    that prompt, forward by forward, up to the last few positions of the context)."""
    from mtp_dist.inference.decode import vocab_parallel_argmax

    head_logits = _continued(model, decoder, windows, prompt, None)
    argmax = [vocab_parallel_argmax(head_logits(i), vocab_size) for i in range(tally.n)]
    tally.add_acceptance(accepted_drafts(torch.stack(argmax)), start=prompt - 1)


def _continued(model, decoder, windows: Tensor, prompt: int, sampling):
    """Each window's first `prompt` tokens continued by the decoder (greedy, or plain sampling)
    to the model's seq_length, and the trunk's forward over them: returns head i's logits
    [s, b, V/tp] over those sequences, one head at a time."""
    prompts = [w[:prompt].tolist() for w in windows]
    continued = decoder.generate(prompts, model.seq_length - prompt, sampling=sampling)
    sequences = torch.tensor([p + g.tokens for p, g in zip(prompts, continued, strict=True)])
    sequences = sequences.to(next(model.parameters()).device)
    h = model.trunk_forward(sequences)
    mask, rope = model._positions(sequences.shape[1], sequences.device)
    return lambda i: model.unembed(model.heads.hidden(i, h, mask, rope))


@torch.no_grad()
def tally_sampled_acceptance(
    model, decoder, windows: Tensor, prompt: int, vocab_size: int, tally, sampling, draws: int = 32
):
    """Acceptance of self-speculative sampling (inference/sampling.py), as `generate
    --speculative K --temperature T` meets it: each window's first `prompt` tokens continued by
    plain sampling to the model's seq_length; on that text, head k's draft at position t is
    accepted with probability sum_x min(p(x), q(x)), p head 1's tempered, truncated
    distribution at t+k-1 and q head k's at t (the rule's acceptance with the draft drawn from
    q); `draws` seeded draws of every position's events, each walked as the decoder walks.
    Teacher-forced as the greedy case is: the text after a draft is the sampled text's, where
    the decoder continues from what it accepted."""
    from mtp_dist.inference.sampling import gather_vocab, probabilities

    head_logits = _continued(model, decoder, windows, prompt, sampling)

    def dist(i: int) -> Tensor:  # head i's distributions [s, b, V] (float64)
        return probabilities(gather_vocab(head_logits(i), vocab_size), sampling)

    n = tally.n
    p = dist(0)
    positions = p.shape[0] - n + 1
    chances = torch.stack(
        [torch.minimum(dist(k - 1)[:positions], p[k - 1 : k - 1 + positions]).sum(-1)
         for k in range(2, n + 1)]
    )  # fmt: skip
    generator = torch.Generator().manual_seed(sampling.seed)
    for _ in range(draws):
        u = torch.rand(chances.shape, generator=generator, dtype=chances.dtype)
        tally.add_acceptance((u < chances).long().cumprod(dim=0).bool(), start=prompt - 1)


def table(summary: dict) -> str:
    d = summary["data"]
    lines = [
        f"Heads on {d['path']} ({d['split']}): {summary['windows']} windows, "
        f"{summary['positions']} positions per head, {summary['verifications']} verifying "
        f"forwards (K=n); acceptance on {d['acceptance_on']}",
        f"  {'head':>4}  {'loss':>7}  {'top-1':>6}  {'acceptance':>10}  {'any position':>12}",
    ]
    for h in summary["heads"]:
        a = f"{h['acceptance']:.4f}" if "acceptance" in h else "-"
        b = f"{h['acceptance_any_position']:.4f}" if "acceptance" in h else "-"
        lines.append(f"  {h['head']:>4}  {h['loss']:7.4f}  {h['accuracy']:6.4f}  {a:>10}  {b:>12}")
    if summary["tokens_per_forward"]:
        lines.append(
            "  tokens/forward (greedy, self-speculative): "
            + ", ".join(f"K={k} {v:.3f}" for k, v in summary["tokens_per_forward"].items())
        )
    return "\n".join(lines)
