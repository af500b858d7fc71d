"""model.attention=sdpa against megatron-core's DotProductAttention (one process, fp32): the core
attention alone on the training mask and on KV-cache masks whose rows have different lengths,
and whole models' losses and gradients. The multi-process layouts are in test_model_parallel.py,
decoding in test_generate.py, a checkpoint across the two settings in test_trainer.py."""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from mtp_dist.config import ModelConfig
from mtp_dist.model.attention import SDPAttention
from mtp_dist.model.model import build_model
from mtp_dist.model.spec import layer_spec, transformer_config
from mtp_dist.model.weights import init_weights

RTOL = 1e-5


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Within RTOL of the reference's largest entry (elementwise relative error is meaningless
    where a gradient crosses zero)."""
    diff = (got - want).abs().max().item()
    assert diff <= RTOL * want.abs().max().item(), f"{what}: differs by {diff:.3g}"


def cores(heads: int, groups: int):
    cfg = ModelConfig(hidden_size=16 * heads, num_attention_heads=heads, num_query_groups=groups)
    config = transformer_config(cfg)
    args = dict(config=config, layer_number=3, attn_mask_type=AttnMaskType.causal)
    return SDPAttention(**args, attention_type="self"), DotProductAttention(
        **args, attention_type="self"
    )


def kv_cache_mask(b: int, c: int, offset: int, lengths: list[int]) -> torch.Tensor:
    """As inference/cache.py builds it: row r sees its first lengths[r] slots and the chunk's
    tokens up to its own (True: hidden), [b, 1, c, offset + c]."""
    slots = torch.arange(offset + c)
    query = torch.arange(c)[:, None]
    in_chunk = (slots >= offset) & (slots <= offset + query)
    valid = slots[None, None, :] < torch.tensor(lengths)[:, None, None]
    return (~(valid | in_chunk[None])).unsqueeze(1)


CASES = {
    # sq, sk, mask type, mask
    "training": (12, 12, AttnMaskType.causal, torch.triu(torch.ones(12, 12, dtype=bool), 1)),
    "kv_prompt": (5, 5, AttnMaskType.causal, kv_cache_mask(3, 5, 0, [0, 0, 0])),
    "kv_chunk": (4, 11, AttnMaskType.no_mask, kv_cache_mask(3, 4, 7, [7, 2, 5])),
    "kv_decode": (1, 8, AttnMaskType.no_mask, kv_cache_mask(3, 1, 7, [3, 7, 1])),
}


@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("case", CASES)
def test_core_attention_equals_megatron(megatron_1proc, case, heads, groups):
    sq, sk, mask_type, mask = CASES[case]
    mask = mask.view(1, 1, sq, sk) if mask.dim() == 2 else mask
    b, d = 3, 16
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(sq, b, heads, d, generator=gen)
    k, v = (torch.randn(sk, b, groups, d, generator=gen) for _ in range(2))
    results = []
    for core in cores(heads, groups):
        inputs = [x.clone().requires_grad_(True) for x in (q, k, v)]
        out = core(*inputs, mask, attn_mask_type=mask_type)
        assert out.shape == (sq, b, heads * d)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), [x.grad for x in inputs]))
    (sdpa, sdpa_grads), (ref, ref_grads) = results
    assert_close_rel(sdpa, ref, "output")
    for name, g, r in zip("qkv", sdpa_grads, ref_grads, strict=True):
        assert_close_rel(g, r, f"d{name}")


def test_sdpa_honours_the_explicit_mask(megatron_1proc):
    """Not a causal mask in disguise: hiding a different key changes the output only in the
    rows that saw it (a kernel that ignored the mask would fail the cache cases above too)."""
    sdpa, _ = cores(4, 2)
    sq, sk, _, mask = CASES["kv_chunk"]
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(sq, 3, 4, 16, generator=gen)
    k, v = (torch.randn(sk, 3, 2, 16, generator=gen) for _ in range(2))
    more = mask.clone()
    more[1, 0, :, 0] = True  # row 1 no longer sees slot 0
    a = sdpa(q, k, v, mask, attn_mask_type=AttnMaskType.no_mask)
    c = sdpa(q, k, v, more, attn_mask_type=AttnMaskType.no_mask)
    assert torch.equal(a[:, [0, 2]], c[:, [0, 2]]) and not torch.allclose(a[:, 1], c[:, 1])


def test_the_spec_chooses_the_core_attention():
    sdpa = layer_spec("sdpa").submodules.self_attention.submodules.core_attention
    ref = layer_spec("megatron").submodules.self_attention.submodules.core_attention
    assert sdpa is SDPAttention and ref is DotProductAttention
    with pytest.raises(ValueError, match="neither 'sdpa' nor 'megatron'"):
        layer_spec("flash")


def model_loss_and_grads(n: int, mode: str, attention: str, groups: int | None):
    cfg = ModelConfig(n_future_tokens=n, num_layers=2, hidden_size=64, num_attention_heads=4,
                      num_query_groups=groups, vocab_size=250, vocab_multiple=64,
                      seq_length=16, head_backward=mode, attention=attention)  # fmt: skip
    model = build_model(cfg)
    init_weights(model, seed=7)
    tokens = torch.randint(0, 250, (2, 16 + n), generator=torch.Generator().manual_seed(1))
    out = model(tokens)
    out.loss.backward()
    cores = {type(m) for m in model.modules() if isinstance(m, SDPAttention | DotProductAttention)}
    return out, {k: p.grad for k, p in model.named_parameters()}, cores


@pytest.mark.parametrize(
    "n,mode,groups",
    [(1, "sequential", None), (1, "sequential", 2), (4, "sequential", 2), (4, "joint", 2)],
)
def test_model_losses_and_gradients_equal_megatron(megatron_1proc, n, mode, groups):
    sdpa, sdpa_grads, sdpa_cores = model_loss_and_grads(n, mode, "sdpa", groups)
    ref, ref_grads, ref_cores = model_loss_and_grads(n, mode, "megatron", groups)
    assert sdpa_cores == {SDPAttention} and ref_cores == {DotProductAttention}
    assert sdpa.loss.item() == pytest.approx(ref.loss.item(), rel=RTOL)
    torch.testing.assert_close(sdpa.head_losses, ref.head_losses, rtol=RTOL, atol=0)
    assert set(sdpa_grads) == set(ref_grads)
    for name, g in sdpa_grads.items():
        assert_close_rel(g, ref_grads[name], name)
