"""The Llama-style megatron-core layer: RMSNorm, SwiGLU, rotary positions, no biases.

One TransformerConfig and one layer spec serve the trunk and the heads, so a head is exactly a
trunk layer placed after the split. A layer's own facts (its shape keys, its training FLOPs per
token) are stated here, next to its spec.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from mtp_dist.config import ModelConfig
from mtp_dist.model.attention import SDPAttention


def fused_softmax_kernels_available() -> bool:
    """megatron-core's fused masked softmax imports compiled kernels (built by Apex or
    megatron's own fused-kernel build) at the first forward; without them the fusion must be
    off, or the first GPU step fails on the import."""
    import importlib.util

    return importlib.util.find_spec("scaled_masked_softmax_cuda") is not None


def transformer_config(
    model: ModelConfig,
    tensor: int = 1,
    pipeline: int = 1,
    dtype: torch.dtype = torch.float32,
    cpu: bool = True,
    recompute: bool = False,
    split: Sequence[int] | None = None,
) -> TransformerConfig:
    """megatron-core's TransformerConfig for the trunk (num_layers = trunk layers); split: the
    trunk layers of each pipeline stage (None: the same number on each)."""
    on_gpu = not cpu
    return TransformerConfig(
        pipeline_model_parallel_layout=pipeline_layout(split),
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_size,
        tensor_model_parallel_size=tensor,
        pipeline_model_parallel_size=pipeline,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_std,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=cpu,
        perform_initialization=True,  # sets the TP attributes; init_weights() then re-inits
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=on_gpu and fused_softmax_kernels_available(),
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        batch_p2p_comm=False,
        deallocate_pipeline_outputs=on_gpu,
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
    )


def pipeline_layout(split: Sequence[int] | None) -> str | None:
    """megatron-core's layout string for an uneven split ("E" the embedding, "t" a trunk layer,
    "L" the loss, "|" between stages): TransformerBlock then builds each stage's share and
    numbers its layers globally, so sharded checkpoint keys do not depend on the split. An even
    split keeps megatron-core's default division."""
    if split is None or len(set(split)) == 1:
        return None
    stages = ["t" * k for k in split]
    return "|".join(["E" + stages[0], *stages[1:-1], stages[-1] + "L"])


def layer_spec(attention: str = "sdpa") -> ModuleSpec:
    """The transformer layer of both trunk and heads (megatron-core's local modules, with the
    chosen core attention; on GPU the same structure with Transformer Engine modules is a
    one-line change of spec). attention: model.attention, "sdpa" (model/attention.py) or
    "megatron" (megatron-core's DotProductAttention, the reference)."""
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    if attention == "sdpa":
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    elif attention != "megatron":
        raise ValueError(f"attention {attention!r} is neither 'sdpa' nor 'megatron'")
    return spec


LAYER_KEYS = ("hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size")
"""ModelConfig keys that determine a layer's parameter shapes."""


def attention_score_flops_per_token(m: ModelConfig) -> float:
    """Training FLOPs per token of one layer's attention scores, QK^T and AV over all
    seq_length keys (causal masking not discounted), forward + backward = 3x forward: the
    layer's matmuls that have no weight."""
    return 3.0 * 2 * 2 * m.seq_length * m.hidden_size


def layer_parameters(m: ModelConfig, tensor: int = 1) -> int:
    """Parameters of one layer on one tensor-parallel rank: the column-parallel qkv and fc1 and
    the row-parallel proj and fc2 split over `tensor`; the two RMSNorms replicated."""
    h, f, hn = m.hidden_size, m.ffn_size, m.hidden_size // m.num_attention_heads
    groups = m.num_query_groups or m.num_attention_heads
    qkv = (m.num_attention_heads + 2 * groups) * hn * h
    proj = m.num_attention_heads * hn * h
    return (qkv + proj + 3 * h * f) // tensor + 2 * h


def layer_flops_per_token(m: ModelConfig) -> float:
    """Training FLOPs per token of one layer: 6 per weight of its matmuls (qkv, proj, SwiGLU;
    2 forward, 4 backward), plus the attention scores."""
    h, f = m.hidden_size, m.ffn_size
    kv = h * (m.num_query_groups or m.num_attention_heads) // m.num_attention_heads
    weights = h * (h + 2 * kv) + h * h + 3 * h * f
    return 3.0 * 2 * weights + attention_score_flops_per_token(m)
