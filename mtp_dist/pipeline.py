"""One global batch through megatron-core's pipeline schedules.

`forward_step` follows megatron-core's contract, (data_iterator, model) -> (output, loss_func),
so the stock schedules (no pipelining, 1F1B) drive the MTP model unchanged. The schedule
divides the last stage's loss by the number of microbatches (and multiplies it by the context-
parallel size and the fp16 loss scale); the sequential heads need that factor up front, so it
is computed here and passed to the model as `loss_scale`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_attr_wrapped_model
from torch import Tensor

from mtp_dist.model.heads import HeadOutput


@dataclass
class StepResult:
    loss: float
    """Mean over microbatches of the weighted sum of head losses (NaN off the last stage)."""
    head_losses: list[float]
    head_accuracy: list[float] | None = None


def schedule_loss_scale(config, num_microbatches: int) -> float:
    """The factor megatron-core's schedule applies to the loss returned by loss_func."""
    scale = parallel_state.get_context_parallel_world_size() / num_microbatches
    if config.grad_scale_func is not None:
        scale *= float(config.grad_scale_func(torch.ones(1)).item())
    return scale


def _loss_func(output: HeadOutput):
    stats = {"head_losses": output.head_losses}
    if output.head_accuracy is not None:
        stats["head_accuracy"] = output.head_accuracy
    # The schedule divides the first value in place; report a copy.
    stats["loss"] = output.loss.detach().clone()
    return output.loss, stats


def forward_step(data_iterator: Iterator[dict[str, Tensor]], model, loss_scale: float):
    batch = next(data_iterator)
    device = next(model.parameters()).device
    tokens = batch["tokens"].to(device, non_blocking=True)
    loss_mask = batch.get("loss_mask")
    if loss_mask is not None:
        loss_mask = loss_mask.to(device, non_blocking=True)
    output = model(tokens, loss_mask=loss_mask, loss_scale=loss_scale)
    return output, _loss_func


def run_schedule(
    model,
    microbatches: list[dict[str, Tensor]],
    seq_length: int,
    forward_only: bool = False,
) -> StepResult:
    """Forward (and backward unless forward_only) of all microbatches of this rank; gradients
    accumulate into the parameters (or megatron DDP's main_grad)."""
    num_mb = len(microbatches)
    config = get_attr_wrapped_model(model, "config")
    scale = schedule_loss_scale(config, num_mb)
    fb = get_forward_backward_func()
    grad_mode = torch.no_grad() if forward_only else torch.enable_grad()
    with grad_mode:
        results = fb(
            forward_step_func=partial(forward_step, loss_scale=scale),
            data_iterator=iter(microbatches),
            model=[model],
            num_microbatches=num_mb,
            seq_length=seq_length,
            micro_batch_size=microbatches[0]["tokens"].shape[0],
            forward_only=forward_only,
        )
    if not parallel_state.is_pipeline_last_stage():
        return StepResult(float("nan"), [])
    loss = torch.stack([r["loss"] for r in results]).mean().item()
    heads = torch.stack([r["head_losses"] for r in results]).mean(0).tolist()
    acc = None
    if results and "head_accuracy" in results[0]:
        acc = torch.stack([r["head_accuracy"] for r in results]).mean(0).tolist()
    return StepResult(loss, heads, acc)
