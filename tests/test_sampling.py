"""Sampling (one process unless marked slow): the tempered, truncated distributions and the
inverse-CDF draw by hand; one random stream per sequence (a sequence's tokens do not depend on
the batch, its order or the other prompts; TP2 gives TP1's); the CLI's settings and its bad
input; and self-speculative sampling's distribution, tested statistically against the exact
distribution of the first three tokens, with a deliberately broken rule shown to be detected.

The statistical tests use a tiny n=4 model over a 6-token vocabulary (padded to 8), trained for
a few steps on sequences that follow a fixed successor of each token with much noise: head 1 is
fairly sure of the next token and heads 2..4 less so and differently, so drafts are both
accepted and rejected, and the residual distribution max(0, p - q) matters."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch

from mtp_dist.config import ModelConfig
from mtp_dist.inference.decode import Decoder
from mtp_dist.inference.sampling import (
    Sampler,
    Sampling,
    draw,
    gather_vocab,
    probabilities,
    sequence_seed,
)
from mtp_dist.model.model import build_model
from mtp_dist.model.weights import init_weights

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*tp_group is None, using default tp group:DeprecationWarning"
)

VOCAB = 6


@pytest.fixture(scope="module")
def small(megatron_1proc):
    """(model, a prompt) of the small-vocabulary model."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster on a loaded machine
    cfg = ModelConfig(
        n_future_tokens=4, num_layers=1, hidden_size=32, num_attention_heads=2,
        num_query_groups=2, vocab_size=VOCAB, vocab_multiple=8, seq_length=16,
    )  # fmt: skip
    model = build_model(cfg)
    init_weights(model, seed=3)
    gen = torch.Generator().manual_seed(0)
    successor = torch.randperm(VOCAB, generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(30):
        x = torch.empty(16, cfg.seq_length + 4, dtype=torch.long)
        x[:, 0] = torch.randint(0, VOCAB, (16,), generator=gen)
        for i in range(1, x.shape[1]):
            jump = torch.rand(16, generator=gen) < 0.4
            noise = torch.randint(0, VOCAB, (16,), generator=gen)
            x[:, i] = torch.where(jump, noise, successor[x[:, i - 1]])
        opt.zero_grad()
        model(x).loss.backward()
        opt.step()
    yield model.eval(), [0, int(successor[0])]
    torch.set_num_threads(threads)


def test_tempered_truncated_distributions_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]], dtype=torch.float64)
    e = torch.exp(logits[0])
    torch.testing.assert_close(probabilities(logits, Sampling(1.0))[0], e / e.sum())
    e2 = torch.exp(logits[0] / 2)
    torch.testing.assert_close(probabilities(logits, Sampling(2.0))[0], e2 / e2.sum())
    top2 = probabilities(logits, Sampling(1.0, top_k=2))[0]
    torch.testing.assert_close(top2, torch.cat([e[:2] / e[:2].sum(), torch.zeros(2)]).double())
    p = e / e.sum()  # 0.644, 0.237, 0.087, 0.032
    # top-p 0.7: 0.644 < 0.7, so the second token is needed too; 0.881 reaches it.
    want = torch.cat([p[:2] / p[:2].sum(), torch.zeros(2)]).double()
    torch.testing.assert_close(probabilities(logits, Sampling(1.0, top_p=0.7))[0], want)
    # top-p below the likeliest token's probability: that token alone.
    only = probabilities(logits, Sampling(1.0, top_p=0.5))[0]
    assert only.tolist() == [1.0, 0.0, 0.0, 0.0]
    for bad in (dict(temperature=-0.1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.01)):
        with pytest.raises(ValueError):
            Sampling(**bad)


def test_inverse_cdf_draw():
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0]] * 5, dtype=torch.float64)
    u = torch.tensor([0.0, 0.2499, 0.25, 0.9999, 1 - 2**-53], dtype=torch.float64)
    assert draw(probs, u).tolist() == [1, 1, 3, 3, 3]  # never a token of probability 0


def test_each_sequence_has_its_own_random_stream(small):
    """The same (seed, prompt, sample index) gives the same tokens alone, in a batch with other
    prompts and in another order, plainly and speculatively; another seed or index others."""
    model, prompt = small
    decoder = Decoder(model, VOCAB)
    prompts = [prompt, [1, 2, 3, 4, 5, 0, 1], [3]]
    s = Sampling(0.9, top_k=5, top_p=0.95, seed=11)
    pairs = [(p, i) for p in prompts for i in (0, 1)]
    for k in (1, 3):
        together = decoder.generate(
            [p for p, _ in pairs], 10, k, sampling=s, samples=[i for _, i in pairs]
        )
        alone = [decoder.generate([p], 10, k, sampling=s, samples=[i])[0] for p, i in pairs]
        reverse = decoder.generate([p for p, _ in pairs[::-1]], 10, k, sampling=s,
                                   samples=[i for _, i in pairs[::-1]])[::-1]  # fmt: skip
        assert [r.tokens for r in together] == [r.tokens for r in alone], k
        assert [r.tokens for r in reverse] == [r.tokens for r in alone], k
        assert len({tuple(r.tokens) for r in together}) == len(pairs), "samples differ"
    other = decoder.generate([prompt], 10, 1, sampling=Sampling(0.9, 5, 0.95, seed=12))
    assert other[0].tokens != together[0].tokens
    assert sequence_seed(1, [1, 2], 0) != sequence_seed(1, [1, 2], 1) != sequence_seed(2, [1, 2], 1)


def test_temperature_zero_is_greedy(small):
    model, prompt = small
    decoder = Decoder(model, VOCAB)
    greedy = decoder.generate([prompt, [5, 4]], 12, k=1)
    for k in (1, 4):
        zero = decoder.generate([prompt, [5, 4]], 12, k, sampling=Sampling(0.0, 2, 0.5, seed=3))
        assert [r.tokens for r in zero] == [r.tokens for r in greedy]


def exact_first_tokens(model, prompt: list[int], s: Sampling, m: int = 3) -> dict:
    """The exact joint distribution of the first m sampled tokens, from head 1's logits over
    every continuation (a full forward each, no cache: independent of the decoder)."""
    pre = [list(c) for c in itertools.product(range(VOCAB), repeat=m - 1)]
    with torch.no_grad():
        (logits,) = model.head_logits(torch.tensor([prompt + c for c in pre]), heads=[0])
    probs = probabilities(gather_vocab(logits, VOCAB), s)  # [len, b, V]
    start = len(prompt) - 1
    joint = {}
    for b, c in enumerate(pre):
        p = 1.0
        for j, token in enumerate(c):
            p *= float(probs[start + j, b, token])
        for last in range(VOCAB):
            joint[(*c, last)] = p * float(probs[start + m - 1, b, last])
    return joint


def distance_and_threshold(samples: list[tuple], exact: dict) -> tuple[float, float]:
    """The total-variation distance of the samples' empirical distribution from the exact one,
    and the largest distance N samples of the exact distribution reach with probability
    1 - 1e-6: E[TV] <= 1/2 sum sqrt(p (1 - p) / N) (Jensen), and one sample moves TV by at
    most 1/N, so P(TV > E[TV] + t) <= exp(-2 N t^2) (McDiarmid)."""
    n = len(samples)
    counts = Counter(samples)
    tv = 0.5 * sum(abs(counts.get(x, 0) / n - p) for x, p in exact.items())
    tv += 0.5 * sum(c / n for x, c in counts.items() if x not in exact)
    expected = 0.5 * sum(math.sqrt(p * (1 - p) / n) for p in exact.values())
    return tv, expected + math.sqrt(math.log(1e6) / (2 * n))


SAMPLES = 20_000
SETTINGS = [Sampling(1.0, seed=1), Sampling(0.7, top_k=3, seed=2), Sampling(1.3, top_p=0.8, seed=3)]


def first_tokens(model, prompt, s: Sampling, k: int) -> tuple[list[tuple], list]:
    # All samples of one prompt in one batch: each has its own stream (its sample index).
    out = Decoder(model, VOCAB).generate(
        [prompt] * SAMPLES, 3, k, sampling=s, samples=list(range(SAMPLES))
    )
    return [tuple(r.tokens[:3]) for r in out], out


@pytest.mark.parametrize("s", SETTINGS, ids=["T1", "T0.7-top_k3", "T1.3-top_p0.8"])
def test_speculative_sampling_keeps_the_distribution(small, s):
    """Plain sampling (k=1) and self-speculative sampling over heads 1..2 (the first three
    tokens take an accepted or replaced draft and a bonus token) and 1..4 (two drafts) draw the
    first three tokens from the exact distribution."""
    model, prompt = small
    exact = exact_first_tokens(model, prompt, s)
    for k in (1, 2, 4):
        samples, out = first_tokens(model, prompt, s, k)
        tv, threshold = distance_and_threshold(samples, exact)
        assert tv < threshold, (k, tv, threshold)
        if k > 1:  # both paths of the rule ran: drafts accepted and rejected
            accepted = sum(r.drafts_accepted[0] for r in out)
            verified = sum(r.verifications for r in out)
            assert 0.2 < accepted / verified < 0.95, (k, accepted / verified)


@pytest.mark.parametrize(
    "name, attribute, broken",
    [
        ("every draft accepted", "accept", lambda u, p, q: torch.ones_like(p, dtype=torch.bool)),
        ("accepted with probability p", "accept", lambda u, p, q: u < p),
        ("a rejected draft replaced by a draw from p", "rejected", lambda p, q: p),
    ],
)
def test_a_broken_rule_is_detected(small, monkeypatch, name, attribute, broken):
    """The test above fails on wrong speculative-sampling rules, the subtle one too (the
    replacement drawn from p instead of max(0, p - q))."""
    model, prompt = small
    s = SETTINGS[0]
    monkeypatch.setattr(Sampler, attribute, staticmethod(broken))
    samples, _ = first_tokens(model, prompt, s, 4)
    tv, threshold = distance_and_threshold(samples, exact_first_tokens(model, prompt, s))
    assert tv > 2 * threshold, (name, tv, threshold)


@pytest.fixture(scope="module")
def byte_model(megatron_1proc, tmp_path_factory):
    """test_generate's tiny n=4 model (byte tokenizer) and its export."""
    from mtp_dist.checkpointing import export_consolidated
    from mtp_dist.config import Config, DataConfig
    from tests.test_generate import _train_tiny_model

    cfg, model, _ = _train_tiny_model()
    config = Config(model=cfg, data=DataConfig(synthetic=True, tokenizer="byte")).to_dict()
    path = tmp_path_factory.mktemp("export") / "n4.pt"
    return cfg, model, export_consolidated(model, path, config, 8)


def test_cli_samples_depend_on_seed_prompt_and_index_only(byte_model):
    """--num-samples per prompt, any --batch, a prompt alone or with others: each sample's
    tokens are those of the decoder with the same settings (sample index from 0)."""
    from tests.test_generate_cli import byte_prompt, generate

    cfg, model, path = byte_model
    prompts = ["!%)-,+", "/#('&$"]
    flags = ["--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "7"]
    flags += ["--max-new-tokens", "12", "--num-samples", "3", "--speculative", "3"]
    both = generate(str(path), "--prompt", prompts[0], "--prompt", prompts[1], *flags)
    batched = generate(str(path), "--prompt", prompts[0], "--prompt", prompts[1], *flags,
                       "--batch", "4")  # fmt: skip
    second = generate(str(path), "--prompt", prompts[1], *flags)
    assert [(r["prompt"], r["sample"]) for r in both] == [(p, i) for p in prompts for i in range(3)]
    assert [r["tokens"] for r in batched] == [r["tokens"] for r in both]
    assert [r["tokens"] for r in second] == [r["tokens"] for r in both[3:]]
    s = Sampling(0.8, 20, 0.9, seed=7)
    want = Decoder(model, cfg.vocab_size).generate(
        [byte_prompt(prompts[1])] * 3, 12, 3, eos_id=257, sampling=s, samples=[0, 1, 2]
    )
    assert [r["tokens"] for r in second] == [r.tokens for r in want]
    assert len({tuple(r["tokens"]) for r in both}) == 6


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "-0.5"], "--temperature -0.5"),
        (["--temperature", "nan"], "--temperature nan"),
        (["--top-p", "0"], "--top-p 0.0"),
        (["--top-p", "1.5"], "--top-p 1.5"),
        (["--top-k", "-1"], "--top-k -1"),
        (["--num-samples", "0"], "--num-samples 0"),
    ],
)
def test_cli_bad_sampling_settings(byte_model, capsys, args, message):
    """One `error:` line, exit 2, before any weight is read."""
    from mtp_dist.generate import main

    assert main([str(byte_model[2]), "--prompt", "ab", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_tp2_samples_are_the_tp1_samples(byte_model):
    """Under torchrun at TP2 (the vocabulary split over the ranks) every rank draws the same
    tokens, and they are TP1's: plain and speculative sampling."""
    from tests.test_generate_cli import byte_prompt, torchrun_generate

    cfg, model, path = byte_model
    prompts = ["!%)-,+", "/#('&$%!,+*)"]
    s = Sampling(1.0, top_p=0.95, seed=3)
    for k in (1, 4):
        want = Decoder(model, cfg.vocab_size).generate(
            [byte_prompt(p) for p in prompts for _ in range(2)], 20, k, eos_id=257,
            sampling=s, samples=[0, 1, 0, 1],
        )  # fmt: skip
        flags = [a for p in prompts for a in ("--prompt", p)]
        flags += ["--max-new-tokens", "20", "--temperature", "1", "--top-p", "0.95"]
        flags += ["--seed", "3", "--num-samples", "2", "--batch", "3"]
        out = torchrun_generate(str(path), *flags, *(["--speculative", "4"] if k > 1 else []))
        assert [r["tokens"] for r in out] == [r.tokens for r in want], k
