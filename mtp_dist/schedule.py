"""One global batch through megatron-core's pipeline schedules, and what a step reports.

`forward_step` follows megatron-core's contract, (data_iterator, model) -> (output, loss_func),
so the stock schedules (no pipelining, 1F1B) drive the MTP model unchanged. The schedule
divides the last stage's loss by the number of microbatches (and multiplies it by the context-
parallel size and the fp16 loss scale); the sequential heads need that factor up front, so it
is computed here and passed to the model as `loss_scale`.

The sequential heads also run their backward inside the forward, so a data-parallel wrapper
that overlaps the gradient reduction must learn which forward belongs to the last microbatch:
`forward_grad_sync(is_last)` (given by the engine) is entered around every forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_attr_wrapped_model
from torch import Tensor

from mtp_dist.model.heads import HeadOutput, check_loss_scale


@dataclass
class StepResult:
    loss: float
    """Mean over microbatches of the weighted sum of head losses (NaN off the last stage)."""
    head_losses: list[float]
    head_accuracy: list[float] | None = None

    @classmethod
    def mean(cls, stats: list[dict[str, Tensor]]) -> StepResult:
        """The mean over microbatches of `microbatch_stats` (the last stage's view), after
        every microbatch's backward. Everything the step reports (and the sequential heads'
        loss-scale check) comes to the host in one transfer: the step's only synchronisation
        here, none per microbatch."""
        n = stats[0]["head_losses"].numel()
        parts = [
            torch.stack([s["loss"].float() for s in stats]).mean().view(1),
            torch.stack([s["head_losses"].float() for s in stats]).mean(0),
        ]
        if "head_accuracy" in stats[0]:
            parts.append(torch.stack([s["head_accuracy"].float() for s in stats]).mean(0))
        if "loss_scale_ratio" in stats[0]:
            parts.append(torch.stack([s["loss_scale_ratio"] for s in stats]))
        values = torch.cat(parts).tolist()
        acc = values[1 + n : 1 + 2 * n] if "head_accuracy" in stats[0] else None
        if "loss_scale_ratio" in stats[0]:
            check_loss_scale(values[-len(stats) :])
        return cls(values[0], values[1 : 1 + n], acc)


def microbatch_stats(output: HeadOutput) -> dict[str, Tensor]:
    """What a step reports of one microbatch (detached copies; the sequential heads' loss-scale
    ratio by reference: their backward writes it later)."""
    stats = {"loss": output.loss.detach().clone(), "head_losses": output.head_losses}
    if output.head_accuracy is not None:
        stats["head_accuracy"] = output.head_accuracy
    if output.loss_scale_ratio is not None:
        stats["loss_scale_ratio"] = output.loss_scale_ratio
    return stats


def batch_to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """A microbatch's tensors on the model's device."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def schedule_loss_scale(config, num_microbatches: int) -> float:
    """The factor megatron-core's schedule applies to the loss returned by loss_func."""
    scale = parallel_state.get_context_parallel_world_size() / num_microbatches
    if config.grad_scale_func is not None:
        scale *= float(config.grad_scale_func(torch.ones(1)).item())
    return scale


def _loss_func(output: HeadOutput):
    # The schedule divides the first value in place; the stats hold a copy.
    return output.loss, microbatch_stats(output)


def forward_step(
    data_iterator: Iterator[dict[str, Tensor]],
    model,
    loss_scale: float,
    grad_sync: Callable[[], AbstractContextManager] = contextlib.nullcontext,
):
    batch = batch_to(next(data_iterator), next(model.parameters()).device)
    with grad_sync():
        output = model(batch["tokens"], loss_mask=batch.get("loss_mask"), loss_scale=loss_scale)
    return output, _loss_func


class _ForwardCounter:
    """grad_sync for forward_step: forward_grad_sync(is_last) around each forward. A stage
    runs its forwards in microbatch order under every schedule, so the count says which is
    the last."""

    def __init__(self, num_microbatches: int, forward_grad_sync):
        self.remaining = num_microbatches
        self.forward_grad_sync = forward_grad_sync

    def __call__(self) -> AbstractContextManager:
        self.remaining -= 1
        return self.forward_grad_sync(self.remaining == 0)


def run_schedule(
    model,
    microbatches: list[dict[str, Tensor]],
    seq_length: int,
    forward_only: bool = False,
    forward_grad_sync: Callable[[bool], AbstractContextManager] | None = None,
) -> StepResult:
    """Forward (and backward unless forward_only) of all microbatches of this rank; gradients
    accumulate into the parameters (or megatron DDP's main_grad). forward_grad_sync(is_last),
    if given, is entered around each training forward (see the module's docstring)."""
    num_mb = len(microbatches)
    config = get_attr_wrapped_model(model, "config")
    scale = schedule_loss_scale(config, num_mb)
    fb = get_forward_backward_func()
    grad_mode = torch.no_grad() if forward_only else torch.enable_grad()
    step = partial(forward_step, loss_scale=scale)
    if forward_grad_sync is not None and not forward_only:
        step = partial(step, grad_sync=_ForwardCounter(num_mb, forward_grad_sync))
    with grad_mode:
        stats = fb(
            forward_step_func=step,
            data_iterator=iter(microbatches),
            model=[model],
            num_microbatches=num_mb,
            seq_length=seq_length,
            micro_batch_size=microbatches[0]["tokens"].shape[0],
            forward_only=forward_only,
        )
    if not parallel_state.is_pipeline_last_stage():
        return StepResult(float("nan"), [])
    return StepResult.mean(stats)
