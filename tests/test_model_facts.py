"""The facts the model states about itself (transformer layers, FLOPs per token, the config keys
of its shapes), checked against the model built on the meta device rather than restated."""

from __future__ import annotations

import dataclasses

import pytest
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.transformer_layer import TransformerLayer

from mtp_dist.config import ModelConfig
from mtp_dist.model.model import (
    HEADS,
    MODEL_KEYS,
    TRUNK_KEYS,
    build_model,
    flops_per_token,
    total_layers,
)
from mtp_dist.model.spec import attention_score_flops_per_token
from mtp_dist.model.weights import _init_std

BASE = dict(
    n_future_tokens=2,
    num_layers=3,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=250,
    vocab_multiple=64,
    seq_length=32,
)
CONFIGS = {
    "n1": dict(BASE, n_future_tokens=1, num_query_groups=None),
    "n2_gqa": BASE,
    "n4": dict(BASE, n_future_tokens=4, num_query_groups=None, ffn_hidden_size=96),
    "n4_gqa_tied": dict(BASE, n_future_tokens=4, num_query_groups=1, tie_embeddings=True),
    "n2_tied": dict(BASE, num_query_groups=None, tie_embeddings=True, vocab_multiple=128),
}


def transformer_layers(model) -> list[TransformerLayer]:
    return [m for m in model.modules() if isinstance(m, TransformerLayer)]


def unembedding_weight(model):
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight


@pytest.mark.parametrize("name", CONFIGS)
def test_flops_per_token_is_six_per_weight_a_token_passes_through(megatron_1proc, name):
    """Training FLOPs per token, less the attention scores, are 6 per weight of every matmul
    a token goes through: the linear layers of the trunk and the heads, and the unembedding
    once per head."""
    cfg = ModelConfig(**CONFIGS[name])
    model = build_model(cfg, device="meta")
    linear = sum(
        m.weight.numel()
        for layer in transformer_layers(model)
        for m in layer.modules()
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear))
    )
    weights = linear + cfg.n_future_tokens * unembedding_weight(model).numel()
    scores = len(transformer_layers(model)) * attention_score_flops_per_token(cfg)
    assert flops_per_token(cfg) - scores == 6 * weights


@pytest.mark.parametrize("name", CONFIGS)
def test_layers_are_numbered_on_from_the_trunk_to_the_heads(megatron_1proc, name):
    cfg = ModelConfig(**CONFIGS[name])
    model = build_model(cfg, device="meta")
    trunk = [layer.layer_number for layer in model.trunk.layers]
    heads = [layer.layer_number for layer in model.heads.layers]
    assert len(heads) == HEADS.num_layers(cfg)
    assert trunk + heads == list(range(1, total_layers(cfg) + 1))
    assert len(transformer_layers(model)) == total_layers(cfg)


def test_scaled_init_depth_is_every_layer_of_the_model(megatron_1proc):
    cfg = ModelConfig(**CONFIGS["n4"])
    model = build_model(cfg, device="meta")
    depth = len(transformer_layers(model))
    scaled = cfg.init_std / (2.0 * depth) ** 0.5
    for name in (
        "trunk.layers.0.self_attention.linear_proj.weight",
        "trunk.layers.2.mlp.linear_fc2.weight",
        "heads.layers.3.mlp.linear_fc2.weight",
    ):
        assert _init_std(model, name) == scaled
    assert _init_std(model, "heads.layers.0.mlp.linear_fc1.weight") == cfg.init_std
    assert _init_std(model, "heads.final_norm.weight") is None
    plain = build_model(dataclasses.replace(cfg, init_scaled_output=False), device="meta")
    assert _init_std(plain, "trunk.layers.0.self_attention.linear_proj.weight") == cfg.init_std


ALTERNATIVES = {
    "n_future_tokens": 3,
    "num_layers": 4,
    "hidden_size": 128,
    "num_attention_heads": 8,
    "num_query_groups": 1,
    "ffn_hidden_size": 96,
    "vocab_size": 400,
    "vocab_multiple": 100,
    "seq_length": 16,
    "head_backward": "joint",
    "attention": "megatron",
    "head_loss_weights": [1.0, 0.5],
    "head_loss_weights_end": [1.0, 0.1],
    "tie_embeddings": True,
    "rotary_base": 500000.0,
    "norm_epsilon": 1e-6,
    "init_std": 0.01,
    "init_scaled_output": False,
    "init_from": "elsewhere",
}


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {k: tuple(p.shape) for k, p in build_model(cfg, device="meta").named_parameters()}


def test_model_keys_are_exactly_the_keys_that_change_parameter_shapes(megatron_1proc):
    """A checkpoint is refused on MODEL_KEYS: each of them changes a parameter's shape, and no
    other config key does."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert set(ALTERNATIVES) == fields, "give every ModelConfig field another value here"
    assert set(MODEL_KEYS) == set(TRUNK_KEYS) | set(HEADS.CONFIG_KEYS)
    assert len(MODEL_KEYS) == len(set(MODEL_KEYS))
    base = ModelConfig(**BASE)
    shapes = param_shapes(base)
    for key, value in ALTERNATIVES.items():
        changed = param_shapes(dataclasses.replace(base, **{key: value})) != shapes
        assert changed == (key in MODEL_KEYS), key


def test_heads_only_flops_are_what_a_heads_only_step_counts(megatron_1proc):
    """flops_per_token(m, "heads") (the trunk and head 1 forward only, heads 2..n without the
    frozen unembedding's weight gradient) over the full statement equals the ratio of the
    FLOPs torch counts in one training step of each (torch counts the attention scores a
    little otherwise, alike in both); detached costs what training everything costs."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mtp_dist.model.weights import init_weights

    cfg = ModelConfig(**CONFIGS["n4"])
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length + cfg.n_future_tokens))
    counted = {}
    for mode in ("all", "heads", "detached"):
        model = build_model(cfg)
        init_weights(model, seed=1)
        model.set_trainable(mode)
        with FlopCounterMode(display=False) as counter:
            model(tokens).loss.backward()
        counted[mode] = counter.get_total_flops()
    assert counted["detached"] == counted["all"]
    stated = flops_per_token(cfg, "heads") / flops_per_token(cfg)
    assert counted["heads"] / counted["all"] == pytest.approx(stated, rel=0.01)
    assert flops_per_token(cfg, "detached") == flops_per_token(cfg)
