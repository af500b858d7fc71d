"""Generation (one process): the KV-cached greedy decoder against recomputing the whole prefix
every step, self-speculative decoding against greedy over many drafts/prompts/lengths/EOS
cases, batches whose sequences accept different numbers of tokens, the vocabulary's padding
(the command line is in test_generate_cli.py).

The model is a tiny n=4 model trained for a few steps on sequences that follow a fixed random
successor of each token (with noise): enough that the heads' drafts are often right and often
wrong, so that both the acceptance and the rejection paths run (the tests check they did)."""

from __future__ import annotations

import dataclasses
import random
import sys

import pytest
import torch

from mtp_dist.config import Config, DataConfig, ModelConfig
from mtp_dist.inference.decode import Decoder, recompute_greedy, vocab_parallel_argmax
from mtp_dist.model.model import build_model
from mtp_dist.model.weights import init_weights
from tests.support import ROOT

# megatron-core's linear layers warn at every forward; decoding runs thousands of small ones,
# and recording each warning costs more than the forward.
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*tp_group is None, using default tp group:DeprecationWarning"
)

ALPHABET = 48  # the training sequences' tokens: 0..47 (the byte tokenizer's 259 in the vocab)


def tiny_config(n: int = 4) -> ModelConfig:
    # 259 = the byte tokenizer's vocabulary, padded to 320: the padding is real here.
    return ModelConfig(
        n_future_tokens=n,
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,  # grouped-query attention: the cache holds 2 key/value heads
        vocab_size=259,
        vocab_multiple=64,
        seq_length=64,
    )


def successor_sequences(gen: torch.Generator, successor: torch.Tensor, b: int, t: int, noise):
    x = torch.empty(b, t, dtype=torch.long)
    x[:, 0] = torch.randint(0, ALPHABET, (b,), generator=gen)
    for i in range(1, t):
        jump = torch.rand(b, generator=gen) < noise
        x[:, i] = torch.where(
            jump, torch.randint(0, ALPHABET, (b,), generator=gen), successor[x[:, i - 1]]
        )
    return x


@pytest.fixture(scope="module")
def trained(megatron_1proc):
    # Tiny matrices: one thread is faster, and spares a loaded machine OpenMP's spinning.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield _train_tiny_model()
    torch.set_num_threads(threads)


def _train_tiny_model():
    cfg = tiny_config()
    model = build_model(cfg)
    init_weights(model, seed=3)
    gen = torch.Generator().manual_seed(0)
    successor = torch.randperm(ALPHABET, generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(8):
        opt.zero_grad()  # before the forward: the sequential heads back-propagate inside it
        model(successor_sequences(gen, successor, 8, cfg.seq_length + 4, 0.15)).loss.backward()
        opt.step()
    model.eval()
    return cfg, model, lambda b, t: successor_sequences(gen, successor, b, t, 0.4)


def test_cached_greedy_equals_recomputing_the_prefix(trained):
    """A batch of prompts of different lengths (the shorter ones' cache rows have stale slots),
    one ending at an end-of-sequence token, one reaching the model's seq_length."""
    cfg, model, sample = trained
    prompts = [sample(1, n)[0].tolist() for n in (1, 7, 30, cfg.seq_length - 5)]
    refs = [recompute_greedy(model, p, 24, cfg.vocab_size) for p in prompts]
    eos = refs[1][5]  # a token greedy produces: some sequences end at it
    refs = [recompute_greedy(model, p, 24, cfg.vocab_size, eos) for p in prompts]
    out = Decoder(model, cfg.vocab_size).generate(prompts, 24, k=1, eos_id=eos)
    assert [r.tokens for r in out] == refs
    assert out[1].finish_reason == "eos" and out[1].tokens[-1] == eos
    assert len(prompts[3]) + len(out[3].tokens) == cfg.seq_length or out[3].tokens[-1] == eos
    assert all(r.forwards == len(r.tokens) for r in out)  # greedy: one token per forward


def test_cached_logits_equal_a_full_forward(trained):
    """The cache itself, for every head, in a batch whose rows keep different numbers of each
    chunk's tokens (as acceptance does): each kept token's logits equal those of one forward
    over the row's whole sequence. Tokens alone would not show a wrong cache entry whenever
    the argmax survives it."""
    from mtp_dist.inference.cache import KVCache

    cfg, model, sample = trained
    gen = torch.Generator().manual_seed(1)
    decoder = Decoder(model, cfg.vocab_size)
    lengths = [3, 9, 5]
    prompts = [sample(1, n)[0].tolist() for n in lengths]
    cache = KVCache(model, len(prompts), cfg.seq_length, torch.device("cpu"))
    padded = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
    for b, p in enumerate(prompts):
        padded[b, : len(p)] = torch.tensor(p)
    sequences = [list(p) for p in prompts]
    with torch.no_grad():
        decoder._forward(padded, cache, 4)
        cache.keep(torch.tensor(lengths))
        for c in (1, 3, 4, 2, 4):
            chunk = torch.randint(0, ALPHABET, (len(prompts), c), generator=gen)
            kept = torch.randint(1, c + 1, (len(prompts),), generator=gen)
            hidden = decoder._forward(chunk, cache, 4)
            cache.keep(kept)
            for b, seq in enumerate(sequences):
                start = len(seq)
                seq += chunk[b, : kept[b]].tolist()
                full = model.head_logits(torch.tensor([seq]))
                for i, hs in enumerate(hidden):
                    got = model.unembed(hs[: kept[b], b : b + 1])
                    want = full[i][start : start + int(kept[b])]
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert cache.lengths.tolist() == [len(s) for s in sequences]


def test_speculative_decoding_gives_greedy_tokens(trained):
    """Property-style: seeded random cases over k, batch, prompt lengths (up to the model's
    seq_length), max_new_tokens and an end-of-sequence token that greedy produces somewhere."""
    cfg, model, sample = trained
    decoder = Decoder(model, cfg.vocab_size)
    rnd = random.Random(0)
    accepted = verified = 0
    finished = set()
    uneven_batch = False
    for _ in range(18):
        k = rnd.randint(2, 4)
        lengths = [rnd.choice([1, rnd.randint(2, 20), rnd.randint(40, cfg.seq_length - 1)])
                   for _ in range(rnd.randint(1, 3))]  # fmt: skip
        prompts = [sample(1, n)[0].tolist() for n in lengths]
        max_new = rnd.randint(1, 30)
        greedy = decoder.generate(prompts, max_new, k=1)
        eos = None
        if rnd.random() < 0.5:
            tokens = [t for r in greedy for t in r.tokens]
            eos = rnd.choice(tokens)
            greedy = decoder.generate(prompts, max_new, k=1, eos_id=eos)
        spec = decoder.generate(prompts, max_new, k=k, eos_id=eos)
        case = f"k={k} lengths={lengths} max_new={max_new} eos={eos}"
        assert [r.tokens for r in spec] == [r.tokens for r in greedy], case
        assert [r.finish_reason for r in spec] == [r.finish_reason for r in greedy], case
        for r in spec:
            assert r.forwards <= len(r.tokens) and len(r.tokens) <= k * r.forwards, case
            accepted += r.drafts_accepted[0]
            verified += r.verifications
            finished.add(r.finish_reason)
        uneven_batch |= len({r.tokens_per_forward for r in spec if len(r.tokens) > 1}) > 1
    # The test means something only if drafts were both accepted and rejected.
    assert 0 < accepted < verified, (accepted, verified)
    assert finished == {"eos", "length"} and uneven_batch


def test_a_batch_decodes_as_its_sequences_alone(trained):
    """Each sequence of a batch accepts its own number of drafts per forward; the tokens and
    the per-sequence statistics are those of the sequence decoded alone."""
    cfg, model, sample = trained
    decoder = Decoder(model, cfg.vocab_size)
    prompts = [sample(1, n)[0].tolist() for n in (3, 11, 25, 6)]
    together = decoder.generate(prompts, 20, k=3)
    alone = [decoder.generate([p], 20, k=3)[0] for p in prompts]
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    assert [r.drafts_accepted for r in together] == [r.drafts_accepted for r in alone]
    assert len({r.forwards for r in together}) > 1


def test_padding_of_the_vocabulary_is_never_chosen(megatron_1proc):
    logits = torch.randn(3, 2, 320)
    logits[..., 259:] = 100.0  # the padding entries would win an unmasked argmax
    torch.testing.assert_close(vocab_parallel_argmax(logits, 259), logits[..., :259].argmax(-1))
    tied = torch.zeros(1, 320)
    assert vocab_parallel_argmax(tied, 259).item() == 0  # ties: the lowest index, as argmax


def test_caches_of_every_head_layer(trained):
    """Speculative decoding caches the trunk's layers and heads 1..k's, each under its own
    layer number; greedy decoding needs head 1 only."""
    cfg, model, sample = trained
    from mtp_dist.inference.cache import KVCache

    decoder = Decoder(model, cfg.vocab_size)
    cache = KVCache(model, 1, 16, torch.device("cpu"))
    decoder._forward(torch.tensor([sample(1, 4)[0].tolist()]), cache, 3)
    assert sorted(cache.context.key_value_memory_dict) == list(range(1, cfg.num_layers + 4))


def test_sdpa_decodes_as_megatron_attention_token_for_token(trained):
    """The trained model (model.attention=sdpa, the default) and the same weights under
    megatron-core's attention: the same greedy and speculative tokens for a batch whose rows
    have different lengths (the explicit KV-cache masks), and the same cached logits."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    cfg, model, sample = trained
    assert cfg.attention == "sdpa"
    ref_cfg = dataclasses.replace(cfg, attention="megatron")
    ref = build_model(ref_cfg)
    ref.load_state_dict(model.state_dict())
    ref.eval()
    assert any(isinstance(m, DotProductAttention) for m in ref.modules())
    prompts = [sample(1, n)[0].tolist() for n in (2, 9, 30, 5)]
    for k in (1, 2, 4):
        got = Decoder(model, cfg.vocab_size).generate(prompts, 20, k=k)
        want = Decoder(ref, cfg.vocab_size).generate(prompts, 20, k=k)
        assert [r.tokens for r in got] == [r.tokens for r in want], f"k={k}"
        assert [r.forwards for r in got] == [r.forwards for r in want], f"k={k}"
    ids = sample(2, 24)
    with torch.no_grad():
        for a, b in zip(model.head_logits(ids), ref.head_logits(ids), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_packed_weights_give_the_same_logits_and_tokens(trained):
    """Inside packed_weights every linear layer multiplies by a packed copy (the packed path is
    really taken); logits equal megatron-core's path, decoding gives the same tokens either way,
    training inside is untouched, and on exit the layers are megatron-core's again."""
    from mtp_dist.inference.packed_linear import _PackedMatmul, available, packed_weights

    cfg, model, sample = trained
    assert available(), "this CPU build of torch has oneDNN's packed linear"
    ids = sample(2, 12)
    with torch.no_grad():
        plain = model.head_logits(ids)
    linears = [m for m in model.modules() if "_forward_impl" in type(m).__dict__]
    with packed_weights(model), packed_weights(model):  # nested: the outer's copies serve
        with torch.no_grad():
            packed = model.head_logits(ids)
        routed = [m.__dict__.get("_forward_impl") for m in linears]
        assert all(isinstance(r, _PackedMatmul) and r.packed for r in routed)
        model.train()
        loss = model(sample(2, cfg.seq_length + 4)).loss  # with grad: megatron-core's path
        model.eval()
    for a, b in zip(plain, packed, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert loss.requires_grad
    model.zero_grad(set_to_none=True)
    assert not any("_forward_impl" in m.__dict__ for m in linears)
    prompts = [sample(1, n)[0].tolist() for n in (3, 9)]
    for k in (1, 3):
        fast = Decoder(model, cfg.vocab_size).generate(prompts, 16, k=k)
        slow = Decoder(model, cfg.vocab_size, packed_weights=False).generate(prompts, 16, k=k)
        assert [r.tokens for r in fast] == [r.tokens for r in slow]


def test_no_packed_copies_where_memory_would_not_hold_them(trained, monkeypatch):
    """A machine whose free memory cannot hold a second copy of the weights decodes with
    megatron-core's matmuls, and says so."""
    import psutil

    from mtp_dist.inference.packed_linear import packed_weights

    cfg, model, sample = trained
    free = sum(p.numel() * p.element_size() for p in model.parameters())  # half of it is needed
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("vm", (), {"available": free}))
    with pytest.warns(UserWarning, match="decoding without packed weights"):
        with packed_weights(model):
            assert not any("_forward_impl" in m.__dict__ for m in model.modules())
    tokens = Decoder(model, cfg.vocab_size).generate([sample(1, 5)[0].tolist()], 8, k=2)
    assert len(tokens[0].tokens) == 8


def test_the_speculative_benchmark_measures_what_it_reports(trained):
    """benchmarks/speculative.py's measurement on the tiny model: every method's tokens checked
    against greedy's, its counts and ratios consistent; the forward-cost table by depth."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import speculative as bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    cfg, model, sample = trained
    decoders = [Decoder(model, cfg.vocab_size), Decoder(model, cfg.vocab_size, None, False)]
    prompts = [sample(1, n)[0].tolist() for n in (4, 7, 5)]
    rows = bench.measure(decoders, prompts, 12, [bench.UNPACKED, 1, 3], batch=2, repeats=1)
    assert [(r["k"], r["packed_weights"]) for r in rows] == [(1, False), (1, True), (3, True)]
    greedy, spec = rows[1], rows[2]
    assert greedy["forwards"] == greedy["tokens"] == 3 * 12 and greedy["speedup"] == 1.0
    assert spec["tokens"] == 36 and spec["forwards"] < 36 and len(spec["acceptance"]) == 2
    assert spec["tokens_per_forward"] == pytest.approx(36 / spec["forwards"])
    assert spec["speedup_per_tokens_per_forward"] == pytest.approx(
        spec["speedup"] / spec["tokens_per_forward"]
    )
    full_config = Config(model=cfg, data=DataConfig(synthetic=True))
    depth = bench.forward_cost_by_depth(full_config, [1, 2], [2, 4], 6, 3, 1)
    assert [(r["trunk_layers"], r["k"]) for r in depth] == [(1, 2), (1, 4), (2, 2), (2, 4)]
    assert depth[1]["layer_ratio"] == pytest.approx(5 / 2)
    assert all(r["verifying_forward_ms"] > 0 and r["greedy_forward_ms"] > 0 for r in depth)
