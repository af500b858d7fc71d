"""Everything a run derives from its config and its world, computed once and passed.

`resolve(cfg, world_size, on_gpu)` checks that the layout fits the world and the batch fits
the layout, and fixes the data-parallel size, the microbatches per rank and step, the dtype
and the sample counts that the datasets must cover. Nothing else re-derives them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mtp_dist.config import Config, ConfigError


@dataclass(frozen=True)
class RunPlan:
    world_size: int
    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    global_batch_size: int
    num_microbatches: int
    """Microbatches each data-parallel rank runs per optimizer step (gradient accumulation)."""
    dtype: Literal["bf16", "fp32"]
    """Parameters and activations: train.dtype, with auto = bf16 on GPU, fp32 on CPU."""
    train_samples: int
    """Samples the run draws for training (every step). Real data is built for its own size
    whatever this is, so its order does not depend on the run's length; synthetic data is built
    for it. The sampler wraps into further epochs either way."""
    eval_samples: int
    """Samples the run draws for evaluation (every evaluation); 0: no validation set."""
    tokens_per_step: int
    overlap_grad_reduce: bool = False
    """train.overlap_grad_reduce, with null = on on GPU."""
    overlap_param_gather: bool = False
    """train.overlap_param_gather, with null = as overlap_grad_reduce (megatron engine only)."""

    @property
    def torch_dtype(self):
        import torch

        return torch.bfloat16 if self.dtype == "bf16" else torch.float32


def resolve(cfg: Config, world_size: int, on_gpu: bool) -> RunPlan:
    p, t = cfg.parallel, cfg.train
    mp = p.tensor * p.pipeline
    if world_size % mp:
        raise ConfigError(
            f"parallel.tensor * parallel.pipeline = {mp} does not divide the world size "
            f"{world_size}: change parallel.tensor/parallel.pipeline or the number of processes"
        )
    dp = world_size // mp
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={t.micro_batch_size} x data-parallel size {dp}: "
            "change one of them"
        )
    overlap_grad = on_gpu if t.overlap_grad_reduce is None else t.overlap_grad_reduce
    overlap_gather = t.overlap_param_gather
    if overlap_gather is None:
        overlap_gather = overlap_grad and cfg.engine == "megatron"
    if overlap_gather and not overlap_grad:
        raise ConfigError(
            "train.overlap_param_gather=true needs train.overlap_grad_reduce, which is off by "
            "default without a GPU: set train.overlap_grad_reduce=true or "
            "train.overlap_param_gather=false"
        )
    evals = t.steps // t.eval_interval + 1 if t.eval_interval else 0
    return RunPlan(
        world_size=world_size,
        tp=p.tensor,
        pp=p.pipeline,
        dp=dp,
        micro_batch_size=t.micro_batch_size,
        global_batch_size=t.global_batch_size,
        num_microbatches=t.global_batch_size // (t.micro_batch_size * dp),
        dtype="bf16" if t.dtype == "bf16" or (t.dtype == "auto" and on_gpu) else "fp32",
        train_samples=t.steps * t.global_batch_size,
        eval_samples=evals * t.eval_steps * t.global_batch_size,
        tokens_per_step=t.global_batch_size * cfg.model.seq_length,
        overlap_grad_reduce=overlap_grad,
        overlap_param_gather=overlap_gather,
    )
