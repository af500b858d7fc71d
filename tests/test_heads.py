"""Head targets, masking and the loss, against hand-computed references (one process)."""

from __future__ import annotations

import dataclasses
import weakref

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from mtp_dist.config import ModelConfig
from mtp_dist.model.heads import head_targets
from mtp_dist.model.model import build_model
from mtp_dist.model.weights import full_state, init_weights, load_full
from mtp_dist.schedule import StepResult, microbatch_stats


def test_head_targets_shift_and_mask_tail():
    tokens = torch.tensor([[10, 11, 12, 13, 14]])  # T = 5, s = 4: only one extra token
    targets, masks = head_targets(tokens, None, seq_length=4, n=3)
    assert targets.shape == (3, 4, 1)
    assert targets[:, :, 0].tolist() == [[11, 12, 13, 14], [12, 13, 14, 0], [13, 14, 0, 0]]
    # Head i has no real target in its last i-1 positions.
    assert masks[:, :, 0].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]]


def test_head_targets_full_window_has_no_mask():
    tokens = torch.arange(7).view(1, 7)  # s + n tokens
    _, masks = head_targets(tokens, None, seq_length=4, n=3)
    assert masks.sum().item() == 12


def test_loss_mask_applies_to_target_positions():
    tokens = torch.arange(6).view(1, 6)
    loss_mask = torch.tensor([[1, 1, 0, 1, 1, 1]])  # token 2 is not a valid target
    _, masks = head_targets(tokens, loss_mask, seq_length=4, n=2)
    assert masks[0, :, 0].tolist() == [1, 0, 1, 1]  # head 1 at t=1 would predict token 2
    assert masks[1, :, 0].tolist() == [0, 1, 1, 1]  # head 2 at t=0 would predict token 2


@pytest.fixture
def tiny_model(megatron_1proc):
    cfg = ModelConfig(
        n_future_tokens=3,
        num_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        vocab_size=50,
        vocab_multiple=16,
        seq_length=6,
    )
    model = build_model(cfg)
    init_weights(model, seed=3)
    return cfg, model


def test_head_losses_match_hand_computed_reference(tiny_model):
    """The last i-1 positions of head i carry no loss: compare with cross-entropy computed
    by hand from the full logits over the positions that have a real target."""
    cfg, model = tiny_model
    tokens = torch.randint(
        0, cfg.vocab_size, (2, cfg.seq_length + 1), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        out = model(tokens)
        logits = model.head_logits(tokens[:, : cfg.seq_length])
    s = cfg.seq_length
    for i in range(1, cfg.n_future_tokens + 1):
        valid = s + 1 - i  # positions t with t + i < T
        lg = logits[i - 1][:valid].transpose(0, 1).reshape(-1, logits[i - 1].shape[-1])
        target = tokens[:, i : i + valid].reshape(-1)
        ref = F.cross_entropy(lg, target)
        assert out.head_losses[i - 1].item() == pytest.approx(ref.item(), rel=1e-6)
        assert out.head_tokens[i - 1].item() == 2 * valid


def test_sequential_heads_refuse_a_wrong_loss_scale(tiny_model):
    """The backward records the scale it saw on the device; the step's one read of its stats
    refuses a mismatch (and accepts the right scale)."""
    cfg, model = tiny_model
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length + cfg.n_future_tokens))
    out = model(tokens, loss_scale=0.5)
    out.loss.backward()
    with pytest.raises(RuntimeError, match="loss was scaled by 2 times the loss_scale"):
        StepResult.mean([microbatch_stats(out)])
    model.zero_grad()
    right = model(tokens, loss_scale=0.5)
    (right.loss * 0.5).backward()
    assert StepResult.mean([microbatch_stats(right)]).loss == pytest.approx(right.loss.item())


def test_sequential_frees_logits_between_heads(tiny_model):
    """Sequential mode keeps no head graph alive after forward: the returned loss's graph
    reaches only the trunk."""
    cfg, model = tiny_model
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length + cfg.n_future_tokens))
    out = model(tokens)
    head_params = {id(p) for p in model.heads.parameters()} | {id(model.output_layer.weight)}
    # Head parameters already hold their gradients when forward returns.
    assert all(p.grad is not None for p in model.heads.parameters())
    seen, stack = set(), [out.loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        assert var is None or id(var) not in head_params, "a head parameter is in the graph"
        stack.extend(f for f, _ in fn.next_functions)


def test_meta_device_build_has_shapes_and_no_storage(megatron_1proc):
    cfg = ModelConfig(
        n_future_tokens=4,
        num_layers=8,
        hidden_size=1024,
        num_attention_heads=16,
        vocab_size=32000,
        seq_length=4096,
    )
    model = build_model(cfg, device="meta")
    n_params = sum(p.numel() for p in model.parameters())
    assert all(p.is_meta for p in model.parameters())
    per_layer = 4 * 1024 * 1024 + 3 * 1024 * cfg.ffn_size + 2 * 1024
    expected = 12 * per_layer + 2 * cfg.padded_vocab_size * 1024 + 1024
    assert n_params == expected


class _LogitsCensus(TorchDispatchMode):
    """Weak references to every tensor of a head's logits size that an op produces, forward or
    backward: the logits themselves, their softmax, their gradient ..."""

    def __init__(self, numel: int, vocab: int):
        super().__init__()
        self.numel, self.vocab, self.refs = numel, vocab, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if (
                isinstance(t, torch.Tensor)
                and t.numel() == self.numel
                and t.shape[-1] == self.vocab
            ):
                self.refs.append(weakref.ref(t))
        return out

    def alive(self) -> int:
        return sum(ref() is not None for ref in self.refs)


@pytest.mark.parametrize("mode", ["sequential", "joint"])
def test_live_logits_when_each_head_starts(megatron_1proc, mode):
    """The memory property itself (the paper's Figure 2): when head i starts its unembedding,
    sequential mode holds no logits-sized tensor of the heads before it; the joint graph holds
    some of every earlier head (this is what makes it cost n times the memory)."""
    n, s, b, vocab = 4, 8, 2, 320  # no other activation is [s, b, 320] (SwiGLU's is 256)
    cfg = ModelConfig(
        n_future_tokens=n, num_layers=1, hidden_size=32, num_attention_heads=2,
        vocab_size=vocab, vocab_multiple=64, seq_length=s, head_backward=mode,
    )  # fmt: skip
    model = build_model(cfg)
    init_weights(model, seed=1)
    census = _LogitsCensus(numel=s * b * vocab, vocab=vocab)
    at_start = []
    model.output_layer.register_forward_pre_hook(lambda *_: at_start.append(census.alive()))
    tokens = torch.randint(0, vocab, (b, s + n), generator=torch.Generator().manual_seed(0))
    with census:
        out = model(tokens)
    assert len(at_start) == n
    if mode == "sequential":
        assert at_start == [0] * n
    else:
        assert at_start[0] == 0 and all(x < y for x, y in zip(at_start, at_start[1:], strict=False))
    del out


def _copy(model, cfg: ModelConfig, trainable: str = "all"):
    """A model of config cfg with `model`'s full weights (heads beyond cfg's n dropped)."""
    other = build_model(cfg)
    state = {k: v for k, v in full_state(model).items() if k in dict(other.named_parameters())}
    load_full(other, state)
    other.set_trainable(trainable)
    return other


def _grads(model) -> dict[str, torch.Tensor | None]:
    return {k: (None if p.grad is None else p.grad.clone()) for k, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["sequential", "joint"])
def test_heads_only_trains_heads_2_to_n_with_a_forward_only_trunk(tiny_model, mode):
    """train.trainable=heads, against the same weights training everything: the same losses;
    heads 2..n get the same gradients; the trunk runs without grad (no graph), and the frozen
    parameters (embedding, trunk, head 1, final norm, unembedding) get no gradient at all."""
    cfg, model = tiny_model
    cfg = dataclasses.replace(cfg, head_backward=mode, head_loss_weights=[1.0, 0.5, 2.0])
    full, heads = _copy(model, cfg), _copy(model, cfg, "heads")
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length + cfg.n_future_tokens))
    grad_mode = []
    heads.trunk.register_forward_hook(lambda *_: grad_mode.append(torch.is_grad_enabled()))
    outs = {}
    for name, m in (("full", full), ("heads", heads)):
        outs[name] = m(tokens)
        outs[name].loss.backward()
    assert grad_mode == [False]
    assert torch.equal(outs["heads"].head_losses, outs["full"].head_losses)
    assert outs["heads"].loss.item() == pytest.approx(outs["full"].loss.item(), rel=1e-6)
    got, ref = _grads(heads), _grads(full)
    trained = [k for k in got if k.startswith(("heads.layers.1.", "heads.layers.2."))]
    assert trained and all(p.requires_grad == (k in trained) for k, p in heads.named_parameters())
    for k in got:
        if k in trained:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-9)
        else:
            assert got[k] is None, f"{k} is frozen but got a gradient"


@pytest.mark.parametrize("mode", ["sequential", "joint"])
def test_detached_trunk_learns_from_head_1_alone(tiny_model, mode):
    """train.trainable=detached: the trunk's (and embedding's) gradients equal those of the
    same weights trained as n=1 (head 1 alone), the heads' (with the final norm and the
    unembedding) those of the normal run."""
    cfg, model = tiny_model
    cfg = dataclasses.replace(cfg, head_backward=mode, head_loss_weights=[1.0, 0.5, 2.0])
    one = dataclasses.replace(cfg, n_future_tokens=1, head_loss_weights=None)
    detached, full, n1 = _copy(model, cfg, "detached"), _copy(model, cfg), _copy(model, one)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length + cfg.n_future_tokens))
    for m in (detached, full, n1):
        m(tokens).loss.backward()
    got, ref, ref1 = _grads(detached), _grads(full), _grads(n1)
    trunk = [k for k in got if k.startswith(("embedding.", "trunk."))]
    assert trunk and len(trunk) < len(got)
    for k, g in got.items():
        expected = ref1[k] if k in trunk else ref[k]
        torch.testing.assert_close(g, expected, rtol=1e-6, atol=1e-9, msg=k)
    # The heads' losses do reach the trunk in the normal run: the check above can fail.
    assert not torch.allclose(ref["trunk.layers.0.mlp.linear_fc2.weight"],
                              got["trunk.layers.0.mlp.linear_fc2.weight"])  # fmt: skip


def test_loss_weights_move_linearly_from_start_to_end():
    m = ModelConfig(n_future_tokens=3, head_loss_weights=[1.0, 0.3, 0.3],
                    head_loss_weights_end=[1.0, 0.1, 0.0])  # fmt: skip
    assert m.loss_weights_at(0.0) == [1.0, 0.3, 0.3]
    assert m.loss_weights_at(0.5) == pytest.approx([1.0, 0.2, 0.15])
    assert m.loss_weights_at(1.0) == m.loss_weights_at(7.0) == [1.0, 0.1, 0.0]
    static = ModelConfig(n_future_tokens=2)
    assert static.loss_weights_at(0.0) == static.loss_weights_at(1.0) == [1.0, 1.0]
