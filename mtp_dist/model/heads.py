"""The n prediction heads, their targets and losses, and the sequential head backward.

Head i (1-based) is one transformer layer; its output goes through the shared final norm and
the shared vocab-parallel unembedding; at position t it predicts token t+i. The loss is the
weighted sum of the heads' cross-entropies.

Sequential mode (the paper's Figure 2): the trunk's output is detached, each head in turn runs
forward, loss and backward, adding into the detached output's gradient, so only one head's
logits are alive at a time. The trunk's backward then runs once, when the pipeline schedule
back-propagates the returned loss. The heads are not recomputed.

What trains (train.trainable, set by MTPModel.set_trainable): all; heads, where head 1 only
computes its loss (without grad: it is frozen, as is the trunk, which then ran without grad)
and heads 2..n back-propagate into their own parameters only; detached, where heads 2..n see a
detached copy of the trunk's output, so their losses reach their parameters but not the trunk.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import sharded_state_dict_default
from torch import Tensor

from mtp_dist.config import ModelConfig
from mtp_dist.distributed import collective_device
from mtp_dist.model.spec import LAYER_KEYS, layer_flops_per_token, layer_parameters


class HeadOutput(NamedTuple):
    loss: Tensor
    """Weighted sum of the heads' mean cross-entropies (scalar, differentiable)."""
    head_losses: Tensor
    """Each head's mean cross-entropy, detached, shape [n]."""
    head_accuracy: Tensor | None = None
    """Each head's top-1 accuracy over its valid positions (only without grad), shape [n]."""
    head_tokens: Tensor | None = None
    """Each head's number of valid target positions, shape [n]."""
    loss_scale_ratio: Tensor | None = None
    """Sequential mode: the factor the caller scaled the loss by in its backward over the one
    the heads were told (`loss_scale`); 1 until that backward has run. A 0-dim tensor on the
    model's device, written by the backward and read once per step with the losses
    (check_loss_scale), so that checking it costs no host synchronisation per microbatch."""


LOSS_SCALE_RTOL = 1e-5


def check_loss_scale(ratios: list[float]) -> None:
    """Raise if any microbatch's backward scaled the loss otherwise than the sequential heads
    were told (see HeadOutput.loss_scale_ratio): their gradients would be wrong."""
    bad = [r for r in ratios if abs(r - 1.0) > LOSS_SCALE_RTOL]
    if bad:
        raise RuntimeError(
            f"sequential heads: the loss was scaled by {bad[0]:.6g} times the loss_scale the "
            "heads back-propagated with; pass the schedule's loss scale to the model"
        )


def head_targets(
    tokens: Tensor, loss_mask: Tensor | None, seq_length: int, n: int
) -> tuple[Tensor, Tensor]:
    """Targets and masks of all heads, shaped [n, s, b] (megatron's sequence-first layout).

    tokens: [b, T] with the inputs in tokens[:, :s]. Head i's target at position t is
    tokens[:, t + i]; where t + i >= T there is no real target and the position is masked out
    (never padded with, or wrapped around to, another token). loss_mask [b, T] marks which
    tokens may serve as targets.
    """
    b, total = tokens.shape
    targets = tokens.new_zeros(n, b, seq_length)
    masks = torch.zeros(n, b, seq_length, dtype=torch.float32, device=tokens.device)
    valid = torch.ones_like(tokens, dtype=torch.float32) if loss_mask is None else loss_mask.float()
    for i in range(1, n + 1):
        width = max(0, min(seq_length, total - i))
        targets[i - 1, :, :width] = tokens[:, i : i + width]
        masks[i - 1, :, :width] = valid[:, i : i + width]
    return targets.transpose(1, 2).contiguous(), masks.transpose(1, 2).contiguous()


def vocab_parallel_correct(logits: Tensor, target: Tensor) -> Tensor:
    """1.0 where the argmax over the full (vocab-parallel) vocabulary equals the target."""
    group = parallel_state.get_tensor_model_parallel_group()
    local_max, local_idx = logits.float().max(dim=-1)
    shard = logits.shape[-1]
    rank = parallel_state.get_tensor_model_parallel_rank()
    global_idx = local_idx + rank * shard
    world = parallel_state.get_tensor_model_parallel_world_size()
    if world > 1:
        device = collective_device(group)
        local_max, global_idx = local_max.to(device), global_idx.to(device)
        maxes = [torch.empty_like(local_max) for _ in range(world)]
        idxs = [torch.empty_like(global_idx) for _ in range(world)]
        torch.distributed.all_gather(maxes, local_max.contiguous(), group=group)
        torch.distributed.all_gather(idxs, global_idx.contiguous(), group=group)
        best = torch.stack(maxes).argmax(dim=0, keepdim=True)
        global_idx = torch.stack(idxs).gather(0, best).squeeze(0).to(target.device)
    return (global_idx == target).float()


class _SequentialHeads(torch.autograd.Function):
    """Runs every head's forward+loss+backward inside forward; hands the accumulated gradient
    of the trunk output to autograd in backward.

    `scale` is the factor the caller (the pipeline schedule, or DeepSpeed's gradient
    accumulation) will apply to the returned loss before back-propagating it; the heads'
    own backward uses it so their parameter gradients match the trunk's. backward() records
    the incoming gradient over that factor in `ratio` (on the device: comparing it on the
    host would synchronise every microbatch); check_loss_scale reads it once per step.
    """

    @staticmethod
    def forward(ctx, trunk_out: Tensor, run: Callable, scale: float, ratio: Tensor):
        h = trunk_out.detach().requires_grad_(True)
        with torch.enable_grad():
            total, head_losses = run(h, scale)
        ctx.scale = scale
        ctx.ratio = ratio
        # None when only heads 2..n train (trainable=heads): the trunk ran without grad and
        # its output only stands in for the caller's backward.
        ctx.save_for_backward(h.grad)
        ctx.mark_non_differentiable(head_losses)
        return total, head_losses

    @staticmethod
    def backward(ctx, grad_total: Tensor, _grad_head_losses: Tensor):
        (grad_h,) = ctx.saved_tensors
        ctx.ratio.copy_(grad_total.detach().float() / ctx.scale)
        return grad_h, None, None, None


class _Batch(NamedTuple):
    """What every head needs besides the trunk's output, for one forward."""

    unembed: Callable[[Tensor], Tensor]
    targets: Tensor
    """[n, s, b] from head_targets()."""
    masks: Tensor
    """[n, s, b] from head_targets()."""
    denom: Tensor
    """Each head's number of valid target positions, shape [n]."""
    attention_mask: Tensor
    rope: Tensor


class MTPHeads(MegatronModule):
    """n head layers and the shared final norm; the unembedding is passed in (it may be tied
    to the input embedding, which the owning LanguageModule manages).

    The class states the facts that the rest of the model derives from the head type (the
    model's depth, its FLOPs, checkpoint compatibility), so that another head type is one
    class: `num_layers`, `flops_per_token`, `num_parameters` and `CONFIG_KEYS`.
    """

    CONFIG_KEYS: ClassVar[tuple[str, ...]] = ("n_future_tokens", *LAYER_KEYS)
    """ModelConfig keys that determine the heads' parameter shapes."""

    @classmethod
    def num_layers(cls, m: ModelConfig) -> int:
        """Transformer layers the heads add after the trunk (numbered on from the trunk's, and
        counted in the depth of the scaled init): one per head."""
        return m.n_future_tokens

    @classmethod
    def flops_per_token(cls, m: ModelConfig, trainable: str = "all") -> float:
        """Training FLOPs per token (forward + backward = 3x forward): the head layers, and the
        shared unembedding once per head (each head's logits feed its own cross-entropy).
        trainable=heads: head 1 forward only (a third); heads 2..n's layers in full, their
        unembedding forward and input gradient only (2x forward: its weight is frozen)."""
        unembed = 2 * m.hidden_size * m.padded_vocab_size
        layer, n = layer_flops_per_token(m), m.n_future_tokens
        if trainable == "heads":
            return layer / 3 + unembed + (n - 1) * (layer + 2.0 * unembed)
        return cls.num_layers(m) * layer + 3.0 * unembed * n

    @classmethod
    def num_parameters(cls, m: ModelConfig, tensor: int = 1) -> int:
        """Parameters on one tensor-parallel rank: the head layers and the shared final norm
        (the unembedding belongs to the model: it may be tied to the embedding)."""
        return cls.num_layers(m) * layer_parameters(m, tensor) + m.hidden_size

    def __init__(
        self,
        config: TransformerConfig,
        model_cfg: ModelConfig,
        spec: ModuleSpec,
        first_layer_number: int,
    ):
        """spec: the trunk's layer spec; first_layer_number: the first head layer's number
        local to the pipeline stage (megatron's layers add the stage's offset)."""
        super().__init__(config=config)
        self.n = model_cfg.n_future_tokens
        self.loss_weights = list(model_cfg.loss_weights)
        self.sequential = model_cfg.head_backward == "sequential"
        self.trainable = "all"
        """train.trainable; see the module's docstring."""
        self.layers = torch.nn.ModuleList(
            build_module(spec, config=config, layer_number=first_layer_number + i)
            for i in range(self.num_layers(model_cfg))
        )
        self.final_norm = WrappedTorchNorm(
            config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
        )

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """dist_checkpointing view: each head layer sharded over TP like a trunk layer (the
        default would treat the ModuleList's tensors as replicated)."""
        state = {}
        for i, layer in enumerate(self.layers):
            state.update(
                layer.sharded_state_dict(f"{prefix}layers.{i}.", sharded_offsets, metadata)
            )
        state.update(
            sharded_state_dict_default(
                self.final_norm,
                f"{prefix}final_norm.",
                sharded_offsets,
                metadata,
                tp_group=parallel_state.get_tensor_model_parallel_group(),
            )
        )
        return state

    def hidden(
        self,
        i: int,
        trunk_out: Tensor,
        attention_mask: Tensor,
        rope: Tensor,
        inference_context=None,
    ) -> Tensor:
        """Head i's (0-based) normed hidden states, [s, b, h]. inference_context: megatron-core's
        KV cache, for generation (mtp_dist.inference); each head layer caches under its own
        layer number."""
        x, _ = self.layers[i](
            trunk_out,
            attention_mask=attention_mask,
            rotary_pos_emb=rope,
            inference_context=inference_context,
        )
        return self.final_norm(x)

    def forward(
        self,
        trunk_out: Tensor,
        unembed: Callable[[Tensor], Tensor],
        targets: Tensor,
        masks: Tensor,
        attention_mask: Tensor,
        rope: Tensor,
        loss_scale: float = 1.0,
    ) -> HeadOutput:
        """trunk_out [s, b, h]; targets/masks [n, s, b] from head_targets(). Without grad: the
        losses and accuracies; with grad: the joint or the sequential mode."""
        denom = masks.sum(dim=(1, 2))
        batch = _Batch(unembed, targets, masks, denom, attention_mask, rope)
        if not torch.is_grad_enabled():
            return self._eval(trunk_out, batch)
        if not self.sequential:
            return self._joint(trunk_out, batch)
        return self._sequential(trunk_out, batch, loss_scale)

    def _trains(self, i: int) -> bool:
        """Whether head i (0-based) back-propagates its loss (head 1 is frozen when only the
        extra heads train)."""
        return i > 0 or self.trainable != "heads"

    def _head_input(self, i: int, h: Tensor) -> Tensor:
        """What head i (0-based) reads of the trunk's output: a detached copy where its loss
        must not reach the trunk (heads 2..n when detached; every head when only heads
        train, so that their backward computes no gradient for the trunk's output)."""
        if (i > 0 and self.trainable == "detached") or self.trainable == "heads":
            return h.detach()
        return h

    def _head_loss(
        self, i: int, h: Tensor, batch: _Batch, with_accuracy: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Head i's (0-based) mean cross-entropy over its valid positions, and its top-1
        accuracy there if asked. Its logits are freed on return."""
        if torch.is_grad_enabled():
            h = self._head_input(i, h)
        logits = batch.unembed(self.hidden(i, h, batch.attention_mask, batch.rope))
        ce = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), batch.targets[i])
        loss = (ce * batch.masks[i]).sum() / batch.denom[i].clamp(min=1.0)
        if not with_accuracy:
            return loss, None
        correct = vocab_parallel_correct(logits, batch.targets[i])
        return loss, (correct * batch.masks[i]).sum() / batch.denom[i].clamp(min=1.0)

    def _eval(self, trunk_out: Tensor, batch: _Batch) -> HeadOutput:
        """Losses and accuracies, without grad."""
        results = [self._head_loss(i, trunk_out, batch, with_accuracy=True) for i in range(self.n)]
        losses = torch.stack([r[0] for r in results])
        total = sum(w * loss for w, loss in zip(self.loss_weights, losses, strict=True))
        acc = torch.stack([r[1] for r in results])
        return HeadOutput(total, losses, acc, batch.denom)

    def _joint(self, trunk_out: Tensor, batch: _Batch) -> HeadOutput:
        """All heads in one autograd graph with the trunk."""
        losses = []
        for i in range(self.n):
            with contextlib.nullcontext() if self._trains(i) else torch.no_grad():
                losses.append(self._head_loss(i, trunk_out, batch)[0])
        total = sum(w * loss for w, loss in zip(self.loss_weights, losses, strict=True))
        return HeadOutput(total, torch.stack([x.detach() for x in losses]), None, batch.denom)

    def _sequential(self, trunk_out: Tensor, batch: _Batch, loss_scale: float) -> HeadOutput:
        """Each head's forward, loss and backward in turn; see _SequentialHeads."""
        run = functools.partial(self._forward_backward_each, batch=batch)
        if not trunk_out.requires_grad:
            # Only heads train: the trunk ran without grad. A leaf makes the returned loss
            # differentiable for the caller's backward, which then ends at once.
            trunk_out = trunk_out.detach().requires_grad_()
        ratio = torch.ones((), dtype=torch.float32, device=trunk_out.device)
        total, losses = _SequentialHeads.apply(trunk_out, run, loss_scale, ratio)
        return HeadOutput(total, losses, None, batch.denom, ratio)

    def _forward_backward_each(self, h: Tensor, scale: float, batch: _Batch):
        """The sequential mode's body, run by _SequentialHeads.forward on the detached trunk
        output h: the weighted total and the heads' losses (both detached)."""
        losses = []
        for i, w in enumerate(self.loss_weights):
            if not self._trains(i):
                with torch.no_grad():
                    losses.append(self._head_loss(i, h, batch)[0])
                continue
            loss, _ = self._head_loss(i, h, batch)
            # Free this head's logits before the next head allocates its own.
            torch.autograd.backward(loss * (w * scale))
            losses.append(loss.detach())
        # Python floats times device scalars: no host-to-device copy of the weights.
        total = sum(w * loss for w, loss in zip(self.loss_weights, losses, strict=True))
        return total, torch.stack(losses)
