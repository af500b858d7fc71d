"""MTPModel: one pipeline stage of the multi-token-prediction transformer.

First stage: the token embedding. Every stage: its share of the trunk's layers. Last stage:
the n heads, the shared final norm and the shared vocab-parallel unembedding (logits are never
gathered over the vocabulary). Activations are sequence-first, [s, b, h], as in megatron-core.

The whole model's facts (its transformer layers, training FLOPs per token, the config keys of its
shapes) are composed here from the layer's (spec.py) and the head type's own statements.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import (
    LanguageModelEmbedding,
)
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from mtp_dist.config import ModelConfig
from mtp_dist.model.heads import HeadOutput, MTPHeads, head_targets
from mtp_dist.model.spec import LAYER_KEYS, layer_flops_per_token, layer_spec, transformer_config

HEADS = MTPHeads
"""The head type on the last stage. Another head type (e.g. DeepSeek-V3's sequential MTP
modules) is a class with MTPHeads' interface (constructor, forward, `hidden` for inference) and
class-level facts (`num_layers`, `flops_per_token`, `CONFIG_KEYS`), named here."""

TRUNK_KEYS = ("num_layers", *LAYER_KEYS, "vocab_size", "vocab_multiple", "tie_embeddings")
"""ModelConfig keys that determine the parameter shapes of the trunk, the embedding and the
unembedding."""

MODEL_KEYS = tuple(dict.fromkeys(TRUNK_KEYS + HEADS.CONFIG_KEYS))
"""ModelConfig keys that determine the model's parameter shapes: a checkpoint saved under other
values of any of them cannot be loaded."""


_EXTRA_HEAD = re.compile(r"^heads\.layers\.(\d+)\.")


def trains(name: str, trainable: str) -> bool:
    """Whether the parameter of global or local name `name` trains under train.trainable:
    everything but with `heads`, where only heads 2..n do (the embedding, the trunk, head 1,
    the final norm and the unembedding keep the weights they started with)."""
    if trainable != "heads":
        return True
    m = _EXTRA_HEAD.match(name)
    return m is not None and int(m.group(1)) >= 1


def total_layers(m: ModelConfig) -> int:
    """Transformer layers of the whole model: the trunk's, then the heads' (numbered on from the
    trunk's; the depth of megatron's scaled init)."""
    return m.num_layers + HEADS.num_layers(m)


def flops_per_token(m: ModelConfig, trainable: str = "all") -> float:
    """Training FLOPs per token (forward + backward = 3x forward) of the whole model: the trunk's
    layers (the embedding is a lookup), and the heads' own statement. train.trainable=heads:
    the trunk runs forward only (a third); detached costs what all does."""
    trunk = m.num_layers * layer_flops_per_token(m)
    return (trunk / 3 if trainable == "heads" else trunk) + HEADS.flops_per_token(m, trainable)


class MTPModel(LanguageModule):
    def __init__(
        self,
        config: TransformerConfig,
        model_cfg: ModelConfig,
        pre_process: bool = True,
        post_process: bool = True,
    ):
        super().__init__(config=config)
        # Passed explicitly: megatron-core deprecates falling back to the global group.
        tp_group = parallel_state.get_tensor_model_parallel_group()
        self.model_cfg = model_cfg
        self.pre_process = pre_process
        self.post_process = post_process
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = model_cfg.tie_embeddings
        tied = model_cfg.tie_embeddings
        self.seq_length = model_cfg.seq_length
        self.n_future_tokens = model_cfg.n_future_tokens
        self.vocab_size = model_cfg.padded_vocab_size
        self.trainable = "all"
        """train.trainable (set_trainable)."""
        spec = layer_spec(model_cfg.attention)

        if pre_process:
            self.embedding = LanguageModelEmbedding(
                config=config,
                vocab_size=self.vocab_size,
                max_sequence_length=self.seq_length,
                position_embedding_type="rope",
                tp_group=tp_group,
            )
        self.rotary_pos_emb = RotaryEmbedding(
            kv_channels=config.kv_channels,
            rotary_percent=1.0,
            rotary_base=model_cfg.rotary_base,
            use_cpu_initialization=config.use_cpu_initialization,
        )
        self.trunk = TransformerBlock(
            config=config, spec=spec, pre_process=pre_process, post_process=False
        )
        if post_process:
            # Numbers local to the stage, as the trunk's: each layer adds the stage's offset, so
            # the heads' numbers follow the last trunk layer's over the whole model.
            self.heads = HEADS(
                config, model_cfg, spec, first_layer_number=len(self.trunk.layers) + 1
            )
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size,
                self.vocab_size,
                config=config,
                init_method=config.init_method,
                bias=False,
                skip_bias_add=False,
                gather_output=False,
                skip_weight_param_allocation=pre_process and tied,
                tp_group=tp_group,
            )
        if pre_process or post_process:
            self.setup_embeddings_and_output_layer()

    def set_trainable(self, trainable: str) -> None:
        """train.trainable; call before an engine wraps the model. With `heads` the frozen
        parameters stop requiring grad (so the engines give them neither gradient buffers
        nor optimizer state) and the trunk runs without grad."""
        self.trainable = trainable
        if self.post_process:
            self.heads.trainable = trainable
        for name, p in self.named_parameters():
            p.requires_grad_(trains(name, trainable))

    def set_head_loss_weights(self, weights: Sequence[float]) -> None:
        """The heads' loss weights from now on (model.head_loss_weights_end: they change over
        training); a no-op on stages without the heads."""
        if self.post_process:
            assert len(weights) == self.n_future_tokens
            self.heads.loss_weights = [float(w) for w in weights]

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, list):
            assert len(input_tensor) == 1, "MTPModel takes one input tensor per stage"
            input_tensor = input_tensor[0]
        self.trunk.set_input_tensor(input_tensor)

    def unembed(self, x: Tensor) -> Tensor:
        """Vocab-parallel logits [s, b, V/tp] of normed hidden states x [s, b, h]."""
        weight = (
            self.shared_embedding_or_output_weight()
            if self.share_embeddings_and_output_weights
            else None
        )
        logits, _ = self.output_layer(x, weight=weight)
        return logits

    def _positions(self, s: int, device) -> tuple[Tensor, Tensor]:
        mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=device), diagonal=1)
        return mask.view(1, 1, s, s), self.rotary_pos_emb(s)

    def trunk_forward(self, input_ids: Tensor | None) -> Tensor:
        """This stage's trunk output [s, b, h] (input_ids [b, s] on the first stage; other
        stages take the tensor set by set_input_tensor)."""
        x = self.embedding(input_ids=input_ids, position_ids=None) if self.pre_process else None
        s = input_ids.shape[1] if input_ids is not None else self.trunk.input_tensor.shape[0]
        device = input_ids.device if input_ids is not None else self.trunk.input_tensor.device
        attention_mask, rope = self._positions(s, device)
        return self.trunk(hidden_states=x, attention_mask=attention_mask, rotary_pos_emb=rope)

    def forward(
        self, tokens: Tensor, loss_mask: Tensor | None = None, loss_scale: float = 1.0
    ) -> Tensor | HeadOutput:
        """tokens [b, T]: inputs are tokens[:, :seq_length]; with T = seq_length + n every
        head has a real target at every position. Returns the hidden states on all but the
        last stage, else the heads' HeadOutput. loss_scale: see heads._SequentialHeads."""
        s = min(self.seq_length, tokens.shape[1] - 1)
        # Only heads train: the frozen trunk keeps no graph and has no backward.
        frozen = self.trainable == "heads" and torch.is_grad_enabled()
        with torch.no_grad() if frozen else contextlib.nullcontext():
            h = self.trunk_forward(tokens[:, :s] if self.pre_process else None)
        if not self.post_process:
            return h
        targets, masks = head_targets(tokens, loss_mask, s, self.n_future_tokens)
        attention_mask, rope = self._positions(s, h.device)
        return self.heads(h, self.unembed, targets, masks, attention_mask, rope, loss_scale)

    def head_logits(self, tokens: Tensor, heads: list[int] | None = None) -> list[Tensor]:
        """Vocab-parallel logits [s, b, V/tp] of the chosen heads (0-based) for inference, on a
        single pipeline stage."""
        assert self.pre_process and self.post_process, "head_logits needs the whole model"
        h = self.trunk_forward(tokens)
        attention_mask, rope = self._positions(tokens.shape[1], tokens.device)
        chosen = range(self.n_future_tokens) if heads is None else heads
        return [self.unembed(self.heads.hidden(i, h, attention_mask, rope)) for i in chosen]


def build_model(
    model_cfg: ModelConfig,
    tensor: int = 1,
    pipeline: int = 1,
    pp_rank: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    recompute: bool = False,
    split: Sequence[int] | None = None,
) -> MTPModel:
    """This stage's model on `device` (weights uninitialised: call weights.init_weights or load
    a checkpoint). device="meta" builds shapes only, e.g. for a planner's dry run. split: the
    trunk layers of each stage (costs.pipeline_split; None: the same number on each)."""
    device = torch.device(device)
    if split is not None and (len(split) != pipeline or sum(split) != model_cfg.num_layers):
        raise ValueError(
            f"split {tuple(split)} does not place {model_cfg.num_layers} trunk "
            f"layers on {pipeline} stages"
        )
    config = transformer_config(
        model_cfg, tensor, pipeline, dtype, device.type != "cuda", recompute, split
    )
    with torch.device(device):
        model = MTPModel(
            config, model_cfg, pre_process=pp_rank == 0, post_process=pp_rank == pipeline - 1
        )
    # megatron-core builds every parameter in params_dtype except torch.nn.RMSNorm's gains,
    # which take torch's default dtype. One dtype for all: a bf16 norm runs torch's fused
    # kernel (a float32 gain with bf16 input falls back, with a warning), and megatron's DDP
    # keeps one gradient buffer instead of one per dtype; the optimizer keeps fp32 main params.
    # (ZeRO-3 builds under a bf16 default dtype: its partitioned parameters already match.)
    with torch.no_grad():
        for p in model.parameters():
            if p.dtype != dtype:
                p.data = p.data.to(dtype)
    return model
