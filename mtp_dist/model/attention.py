"""Core attention through torch.nn.functional.scaled_dot_product_attention (model.attention=sdpa).

A drop-in for megatron-core's local DotProductAttention in the layer spec's `core_attention`
slot: the same constructor and call, the same [s, b, heads/tp * head_dim] output. Where
megatron-core's version materialises the s x s scores and probabilities (and keeps them for
backward), SDPA dispatches to a fused kernel (flash or memory-efficient on GPU, the flash
kernel on CPU) that keeps only the output and the softmax's log-sum-exp.

Masks: megatron-core's causal mask type with as many queries as keys (training, and the first
forward of a KV cache, whose mask is then causal too) takes SDPA's causal fast path, as
Transformer Engine's attention does; any other call honours the explicit boolean mask it is
given (True: hidden), which the KV-cache path relies on (rows of different lengths, no_mask
type after the prompt).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor


class SDPAttention(MegatronModule):
    """megatron-core core attention on torch's scaled_dot_product_attention. It sees only this
    tensor-parallel rank's heads (heads / tp queries, groups / tp keys and values, as the
    attention's column-parallel projection splits them), so it needs no process group."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        # Refused rather than approximated: these change the maths megatron-core's reference
        # would do, and nothing in this project sets them.
        if dropout != 0.0:
            raise ValueError("model.attention=sdpa supports no attention dropout")
        if config.context_parallel_size != 1:
            raise ValueError("model.attention=sdpa supports no context parallelism")
        if config.window_size is not None or config.softmax_type != "vanilla":
            raise ValueError("model.attention=sdpa supports plain causal softmax attention only")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.head_dim = config.kv_channels
        # megatron-core's scale: 1/sqrt(head_dim) unless configured; query-key layer scaling
        # divides the scores by the layer number and the softmax multiplies it back (fp16 only),
        # which leaves the probabilities unchanged.
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params=None,
    ) -> Tensor:
        """query [sq, b, heads, d], key and value [sk, b, groups, d] (this rank's) ->
        context [sq, b, heads * d]."""
        assert packed_seq_params is None, "packed sequences need Transformer Engine's attention"
        assert attention_bias is None, "attention bias is not supported"
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        sq, b = query.shape[0], query.shape[1]
        # [s, b, n, d] -> [b, n, s, d], as views: the kernels take strided inputs.
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        causal = mask_type == AttnMaskType.causal and query.shape[0] == key.shape[0]
        mask = None
        if not causal and attention_mask is not None:
            mask = ~attention_mask  # megatron: True hides; SDPA: True attends
        context = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=causal,
            scale=self.softmax_scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )
        return context.permute(2, 0, 1, 3).reshape(sq, b, -1)
