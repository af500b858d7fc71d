"""The Hugging Face Llama format of a model: full tensors (weights.py's global names) <->
`LlamaForCausalLM` tensors, and its config.json <-> ModelConfig (the directory that holds them
is hf_dir.py).

A model with n heads is a Llama of num_layers + 1 layers (the trunk, then head 1), the shared
final norm and the unembedding, with megatron's vocabulary padding removed. Heads 2..n are
layers in Llama's own names in a sidecar, `mtp_heads.safetensors`, described by
`mtp_heads.json`: head k applies its layer to the trunk's output (the input of Llama layer
num_layers), then the final norm and the unembedding, and predicts the token k ahead. n = 1
writes no sidecar: the directory is a plain Llama.

Layout facts: megatron fuses q, k, v into one weight, grouped by query group ([q of the group's
heads; k; v] per group), and SwiGLU's fc1 is [gate; up]; both are full tensors here (weights.py
undoes the tensor-parallel sharding). The layer itself (RMSNorm, SwiGLU, rotary, no biases: see
spec.py) is exactly Llama's; a Llama config outside that (biases, another activation, scaled
rotary positions) is refused.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtp_dist.config import ModelConfig
from mtp_dist.errors import UserError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
HEADS_WEIGHTS = "mtp_heads.safetensors"
HEADS_JSON = "mtp_heads.json"
HEADS_FORMAT = "mtp-dist-heads-v1"
RECORD = "mtp_dist.json"
RECORD_FORMAT = "mtp-dist-llama-v1"
"""What the directory's model was trained with that a Llama config cannot say: the identity of
its tokenizer (also when no tokenizer file is written, e.g. the byte tokenizer) and its step."""
_POSITIVE_INTS = (
    "hidden_size",
    "num_attention_heads",
    "num_hidden_layers",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
)

_SAME = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_QKV = "self_attention.linear_qkv.weight"
_FC1 = "mlp.linear_fc1.weight"


class HFFormatError(UserError, ValueError):
    """A directory that is not a Llama this model can be, or does not match the config."""


def _attention(m: ModelConfig) -> tuple[int, int, int]:
    """(query heads, query groups, head dim)."""
    heads = m.num_attention_heads
    return heads, m.num_query_groups or heads, m.hidden_size // heads


def layer_to_llama(ours: dict[str, Tensor], m: ModelConfig) -> dict[str, Tensor]:
    """One transformer layer: megatron names (relative to the layer) -> Llama names."""
    heads, groups, dim = _attention(m)
    per_group = heads // groups
    out = {llama: ours[name] for name, llama in _SAME.items()}
    qkv = ours[_QKV].view(groups, (per_group + 2) * dim, -1)
    out["self_attn.q_proj.weight"] = qkv[:, : per_group * dim].reshape(heads * dim, -1)
    out["self_attn.k_proj.weight"] = qkv[:, per_group * dim : (per_group + 1) * dim].reshape(
        groups * dim, -1
    )
    out["self_attn.v_proj.weight"] = qkv[:, (per_group + 1) * dim :].reshape(groups * dim, -1)
    out["mlp.gate_proj.weight"], out["mlp.up_proj.weight"] = ours[_FC1].chunk(2, dim=0)
    return {k: v.contiguous() for k, v in out.items()}


def layer_from_llama(llama: dict[str, Tensor], m: ModelConfig) -> dict[str, Tensor]:
    """One transformer layer: Llama names -> megatron names (relative to the layer)."""
    heads, groups, dim = _attention(m)
    h = m.hidden_size
    out = {name: llama[hf] for name, hf in _SAME.items()}
    q = llama["self_attn.q_proj.weight"].reshape(groups, heads // groups * dim, h)
    k = llama["self_attn.k_proj.weight"].reshape(groups, dim, h)
    v = llama["self_attn.v_proj.weight"].reshape(groups, dim, h)
    out[_QKV] = torch.cat([q, k, v], dim=1).reshape(-1, h)
    out[_FC1] = torch.cat([llama["mlp.gate_proj.weight"], llama["mlp.up_proj.weight"]], dim=0)
    return out


def _layer(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _trunk_and_head1(m: ModelConfig) -> list[str]:
    """Our layer prefixes in Llama's layer order."""
    return [f"trunk.layers.{i}." for i in range(m.num_layers)] + ["heads.layers.0."]


def to_llama(state: dict[str, Tensor], m: ModelConfig) -> tuple[dict, dict]:
    """(Llama tensors, extra-head tensors keyed `heads.K.<llama layer name>` for K = 2..n) of
    a full state (global names, any vocabulary padding)."""
    llama = {}
    for j, prefix in enumerate(_trunk_and_head1(m)):
        for k, v in layer_to_llama(_layer(state, prefix), m).items():
            llama[f"model.layers.{j}.{k}"] = v
    vocab = m.vocab_size
    llama["model.embed_tokens.weight"] = state["embedding.word_embeddings.weight"][:vocab]
    llama["model.norm.weight"] = state["heads.final_norm.weight"]
    if not m.tie_embeddings:
        llama["lm_head.weight"] = state["output_layer.weight"][:vocab]
    extra = {}
    for i in range(1, m.n_future_tokens):
        for k, v in layer_to_llama(_layer(state, f"heads.layers.{i}."), m).items():
            extra[f"heads.{i + 1}.{k}"] = v
    return llama, extra


def from_llama(llama: dict[str, Tensor], extra: dict[str, Tensor], m: ModelConfig) -> dict:
    """The full state (global names; the vocabulary unpadded) of Llama tensors and extra-head
    tensors as to_llama gives them; m.n_future_tokens must be 1 + the extra heads."""
    state = {}
    for j, prefix in enumerate(_trunk_and_head1(m)):
        layer = _layer(llama, f"model.layers.{j}.")
        for k, v in layer_from_llama(layer, m).items():
            state[prefix + k] = v
    for i in range(1, m.n_future_tokens):
        for k, v in layer_from_llama(_layer(extra, f"heads.{i + 1}."), m).items():
            state[f"heads.layers.{i}.{k}"] = v
    state["embedding.word_embeddings.weight"] = llama["model.embed_tokens.weight"]
    state["heads.final_norm.weight"] = llama["model.norm.weight"]
    if not m.tie_embeddings:
        state["output_layer.weight"] = llama["lm_head.weight"]
    return state


def llama_layer_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The tensors of one Llama layer (extra heads included) and their shapes."""
    heads, groups, dim = _attention(m)
    h, f = m.hidden_size, m.ffn_size
    return {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (heads * dim, h),
        "self_attn.k_proj.weight": (groups * dim, h),
        "self_attn.v_proj.weight": (groups * dim, h),
        "self_attn.o_proj.weight": (h, heads * dim),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }


def llama_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The tensors of the Llama that holds the trunk and head 1, and their shapes."""
    layer = llama_layer_shapes(m)
    shapes = {f"model.layers.{j}.{k}": s for j in range(m.num_layers + 1) for k, s in layer.items()}
    shapes["model.embed_tokens.weight"] = (m.vocab_size, m.hidden_size)
    shapes["model.norm.weight"] = (m.hidden_size,)
    if not m.tie_embeddings:
        shapes["lm_head.weight"] = (m.vocab_size, m.hidden_size)
    return shapes


def llama_config(m: ModelConfig, special_ids: dict[str, int] | None = None) -> dict:
    """config.json of the Llama that holds the trunk and head 1. special_ids: the tokenizer's
    bos/eos/pad ids (`bos_token_id` ...), if known."""
    heads, groups, dim = _attention(m)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_size,
        "num_hidden_layers": m.num_layers + 1,
        "num_attention_heads": heads,
        "num_key_value_heads": groups,
        "head_dim": dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.seq_length,
        "rms_norm_eps": m.norm_epsilon,
        "rope_theta": m.rotary_base,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": m.tie_embeddings,
        "initializer_range": m.init_std,
        "torch_dtype": "float32",
        **(special_ids or {}),
    }


def _rope_theta(cfg: dict, where: str) -> float:
    """rope_theta of a v4 (`rope_theta`, `rope_scaling`) or v5 (`rope_parameters`) config;
    scaled rotary positions are refused."""
    params = cfg.get("rope_parameters") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    scaling = cfg.get("rope_scaling")
    if kind != "default" or (
        scaling and scaling.get("rope_type", scaling.get("type")) != "default"
    ):
        raise HFFormatError(
            f"{where} uses scaled rotary positions ({params or scaling}), which this model "
            "does not have: import a Llama without rope scaling"
        )
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def model_fields(cfg: dict, where: str) -> dict:
    """The ModelConfig fields (effective values) a Llama config.json implies for a model whose
    trunk and head 1 it holds; HFFormatError if it is no Llama, or one our layer cannot be."""
    if cfg.get("model_type") != "llama":
        raise HFFormatError(
            f"{where} has model_type={cfg.get('model_type')!r}, not 'llama': model.init_from "
            "takes a Llama (LlamaForCausalLM) directory"
        )
    unsupported = [
        (key, cfg.get(key), ok)
        for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False))
        if cfg.get(key, ok) != ok
    ]
    if unsupported:
        key, value, ok = unsupported[0]
        raise HFFormatError(
            f"{where} has {key}={value!r}; this model's layers have {key}={ok!r} (SwiGLU, no "
            "biases): import a Llama with that layer"
        )
    for key in (*_POSITIVE_INTS, "num_key_value_heads"):
        value = cfg[key] if key in _POSITIVE_INTS else cfg.get(key) or 1
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise HFFormatError(f"{where} has {key}={value!r}: it must be an integer >= 1")
    for key in ("rope_theta", "rms_norm_eps"):
        value = cfg.get(key, 1.0)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise HFFormatError(f"{where} has {key}={value!r}: it must be a number > 0")
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if cfg.get("head_dim") not in (None, hidden // heads) or hidden % heads:
        raise HFFormatError(
            f"{where} has head_dim={cfg.get('head_dim')} with hidden_size={hidden} and "
            f"{heads} heads; this model needs head_dim = hidden_size / num_attention_heads"
        )
    if cfg["num_hidden_layers"] < 2:
        raise HFFormatError(
            f"{where} has {cfg['num_hidden_layers']} layer(s): the trunk gets all but the last "
            "(head 1's), so import a Llama of at least 2 layers"
        )
    return {
        "num_layers": cfg["num_hidden_layers"] - 1,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_query_groups": cfg.get("num_key_value_heads") or heads,
        "ffn_hidden_size": cfg["intermediate_size"],
        "vocab_size": cfg["vocab_size"],
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "rotary_base": _rope_theta(cfg, where),
        "norm_epsilon": float(cfg.get("rms_norm_eps", 1e-6)),
    }


def effective_fields(m: ModelConfig) -> dict:
    """The fields model_fields gives, of a ModelConfig."""
    return {
        "num_layers": m.num_layers,
        "hidden_size": m.hidden_size,
        "num_attention_heads": m.num_attention_heads,
        "num_query_groups": m.num_query_groups or m.num_attention_heads,
        "ffn_hidden_size": m.ffn_size,
        "vocab_size": m.vocab_size,
        "tie_embeddings": m.tie_embeddings,
        "rotary_base": m.rotary_base,
        "norm_epsilon": m.norm_epsilon,
    }


def check_matches(source: dict, m: ModelConfig, where: str) -> None:
    """HFFormatError naming the first field where a source's fields (effective_fields) differ
    from the model's; the number of heads may differ."""
    for key, want in effective_fields(m).items():
        have = source[key]
        if have != want:
            raise HFFormatError(
                f"{where} has model.{key}={have!r} but the config says model.{key}={want!r}: "
                f"set model.{key}={have!r} to start from it"
            )
