"""Induction success on the induction task's held-out shards (data_prep/induction.py), as the
paper defines it (Gloeckle et al. 2024, Section 4.1): at every later occurrence of a renamed
name, whether head 1 predicts the name's second token given everything up to its first.

What is scored, exactly. The held-out shards are packed and cut into consecutive windows of
seq_length + 1 tokens (evaluate/heads.py's windows, the same for every n: only head 1 is
scored), the model reading the first seq_length. A position t of a window is scored when
- its token is a first-half piece and token t+1 a second-half piece (every first-half token
  must be followed by a second-half token and every second-half token preceded by a first-half
  one: a name that is not exactly those two tokens is an error, not a skipped position), and
- the same first-half piece occurs at an earlier position u of the same window with no
  end-of-document token between u and t: an earlier occurrence of the same name, in the same
  function, that the model can see. Within a function the first halves are distinct, so the
  name's second token at u is the one at t (checked: a mismatch is an error).
A first occurrence is never scored, nor an occurrence whose earlier ones lie outside the window
or in another document. The hit: head 1's argmax at t (over the real vocabulary) is token t+1.
A model that cannot look back guesses the second half at best at 1 / |second pool| (the
corpus's names.json `chance`).

Alongside: head 1's mean cross-entropy over every position of the same windows (the ordinary
validation loss), and at the scored positions alone (`scored_loss`, in nats: ln |second pool|
for a uniform guess among the second halves; it moves before the top-1 does).

The paper's measure sees one kind of copying only: a model can copy the other half of a name
and score chance on it (measured on the copy control: benchmarks/README.md). So a second measure,
`first_half_success`, scores the first halves that copying predicts: a position t whose next
token is a first-half piece F, where the two tokens at t-1 and t occurred together earlier in
the same document and were followed there by F every time (in the copy control, every name of
the repeat but its first; in code, a name inside a span that repeats). Only head 1's top-1
again; a model that cannot look back guesses at best among the first halves (`first_chance`,
1 / |first pool|, or somewhat better if it recalls which first halves the document has used).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mtp_dist.errors import UserError


class InductionDataError(UserError, ValueError):
    """Tokens that do not hold the induction task's names as two tokens each."""


@dataclass
class Pieces:
    """The token ids of the name halves, as lookup tables over the vocabulary."""

    first: np.ndarray
    second: np.ndarray
    eod_id: int
    chance: float

    @classmethod
    def of(cls, tokenizer, info: dict) -> Pieces:
        from data_prep.induction import piece_ids

        first_ids, second_ids = piece_ids(tokenizer, info)
        first = np.zeros(tokenizer.vocab_size, dtype=bool)
        second = np.zeros(tokenizer.vocab_size, dtype=bool)
        first[first_ids] = True
        second[second_ids] = True
        return cls(first, second, tokenizer.eod_id, 1 / len(second_ids))


def scored_positions(window: np.ndarray, pieces: Pieces) -> np.ndarray:
    """Positions t < len(window) - 1 to score in one window (the module's docstring)."""
    tokens = np.asarray(window)
    is_first, is_second = pieces.first[tokens], pieces.second[tokens]
    # Every first half is followed by a second half; the window's last token may be a first
    # half whose second lies beyond it, and its first token a second half whose first lies
    # before it.
    bad = np.flatnonzero(is_first[:-1] & ~is_second[1:])
    bad = np.concatenate([bad, np.flatnonzero(is_second[1:] & ~is_first[:-1]) + 1])
    if len(bad):
        t = int(bad.min())
        raise InductionDataError(
            f"tokens {tokens[max(0, t - 1) : t + 2].tolist()} at position {t}: a name piece "
            "without its other half; these shards do not hold the induction task's names as "
            "two tokens (tokenize the corpus with the tokenizer trained with --user-symbols)"
        )
    scored, seen = [], {}
    # Documents end at eod tokens: an earlier occurrence counts only in the same document.
    doc = np.cumsum(tokens == pieces.eod_id)
    for t in np.flatnonzero(is_first[:-1]).tolist():
        key = (int(doc[t]), int(tokens[t]))
        if key in seen:
            if seen[key] != tokens[t + 1]:
                raise InductionDataError(
                    f"the name starting with token {tokens[t]} ends with token {seen[key]} and "
                    f"later with {tokens[t + 1]} in one document: not the induction task's data"
                )
            scored.append(t)
        else:
            seen[key] = int(tokens[t + 1])
    return np.asarray(scored, dtype=np.int64)


def first_half_positions(window: np.ndarray, pieces: Pieces) -> np.ndarray:
    """Positions t whose next token is a first half that the two tokens before it (t-1, t)
    were followed by, every time, earlier in the same document (the module's docstring)."""
    tokens = np.asarray(window).tolist()
    doc = np.cumsum(np.asarray(window) == pieces.eod_id).tolist()
    followers: dict[tuple, set] = {}  # (document, token t-1, token t) -> tokens seen at t+1
    scored = []
    for t in range(1, len(tokens) - 1):
        if doc[t - 1] != doc[t]:
            continue  # the pair straddles a document's end
        key, nxt = (doc[t], tokens[t - 1], tokens[t]), tokens[t + 1]
        if pieces.first[nxt] and followers.get(key) == {nxt}:
            scored.append(t)
        followers.setdefault(key, set()).add(nxt)
    return np.asarray(scored, dtype=np.int64)


@dataclass
class InductionTally:
    """Sums over windows; `summary` gives the rates."""

    chance: float
    first_chance: float
    windows: int = 0
    scored: int = 0
    hits: int = 0
    scored_loss_sum: float = 0.0
    loss_sum: float = 0.0
    positions: int = 0
    first_scored: int = 0
    first_hits: int = 0

    def add(self, windows: np.ndarray, argmax: np.ndarray, losses: np.ndarray, pieces: Pieces):
        """windows [b, s+1]; head 1's argmax [b, s] and cross-entropy [b, s] at each position."""
        for w, guess, loss in zip(windows, argmax, losses, strict=True):
            t = scored_positions(w, pieces)
            self.scored += len(t)
            self.hits += int((guess[t] == w[t + 1]).sum())
            self.scored_loss_sum += float(np.asarray(loss, dtype=np.float64)[t].sum())
            f = first_half_positions(w, pieces)
            self.first_scored += len(f)
            self.first_hits += int((guess[f] == w[f + 1]).sum())
        self.windows += len(windows)
        self.loss_sum += float(np.asarray(losses, dtype=np.float64).sum())
        self.positions += losses.size

    def summary(self) -> dict:
        return {
            "induction_success": round(self.hits / self.scored, 4) if self.scored else None,
            "scored_occurrences": self.scored,
            "chance": round(self.chance, 4),
            "scored_loss": round(self.scored_loss_sum / self.scored, 4) if self.scored else None,
            "head1_loss": round(self.loss_sum / max(1, self.positions), 4),
            "windows": self.windows,
            "first_half_success": (
                round(self.first_hits / self.first_scored, 4) if self.first_scored else None
            ),
            "first_half_scored": self.first_scored,
            "first_chance": round(self.first_chance, 4),
        }


def model_predictor(model, vocab_size: int) -> Callable:
    """windows [b, s+1] -> (head 1's argmax [b, s], its cross-entropy [b, s]) of a model built
    by mtp_dist.model (one forward of the trunk and head 1)."""
    import torch
    from megatron.core import tensor_parallel

    from mtp_dist.inference.decode import vocab_parallel_argmax

    @torch.no_grad()
    def predict(windows: np.ndarray):
        model.eval()
        device = next(model.parameters()).device
        tokens = torch.from_numpy(np.ascontiguousarray(windows)).to(device)
        logits = model.head_logits(tokens[:, :-1], heads=[0])[0]  # [s, b, V]
        targets = tokens[:, 1:].T.contiguous()  # [s, b], as the logits
        ce = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), targets)
        argmax = vocab_parallel_argmax(logits, vocab_size)
        return argmax.T.cpu().numpy(), ce.T.double().cpu().numpy()

    return predict


def score_windows(windows, predict: Callable, pieces: Pieces, batch: int = 8) -> dict:
    """The tally over an iterator of windows [s+1] with `predict` (model_predictor, or any
    function of the same shape)."""
    tally, pending = InductionTally(pieces.chance, 1 / int(pieces.first.sum())), []

    def flush():
        stacked = np.stack(pending)
        argmax, losses = predict(stacked)
        tally.add(stacked, np.asarray(argmax), np.asarray(losses), pieces)
        pending.clear()

    for w in windows:
        pending.append(np.asarray(w, dtype=np.int64))
        if len(pending) == batch:
            flush()
    if pending:
        flush()
    return tally.summary()


def table(rows: list[dict]) -> str:
    lines = [
        "| source | step | windows | scored | induction success | chance | loss at scored "
        "| head 1 loss | first halves scored | first-half success | chance |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def rate(x):
        return "-" if x is None else f"{x:.4f}"

    for r in rows:
        lines.append(
            f"| {r['source']} | {r['step']} | {r['windows']} | {r['scored_occurrences']} | "
            f"{rate(r['induction_success'])} | {r['chance']:.4f} | {r['scored_loss'] or 0:.4f} | "
            f"{r['head1_loss']:.4f} | {r['first_half_scored']} | "
            f"{rate(r['first_half_success'])} | {r['first_chance']:.4f} |"
        )
    return "\n".join(lines)
