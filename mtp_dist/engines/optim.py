"""What both engines' optimizers share: AdamW's parameter groups, the learning-rate schedule
(linear warm-up, cosine decay to lr * min_lr_ratio), and the repair of Adam's step counts
after a checkpoint load.

The schedule's convention: optimizer step k (1-based) runs at the schedule's value for k, so
the first step does not run at lr 0.
"""

from __future__ import annotations

import math

import torch

from mtp_dist.config import TrainConfig


def decay_steps(t: TrainConfig) -> int:
    """The schedule's horizon: the step at which the cosine reaches its floor; train.steps
    unless train.lr_decay_steps sets it (at least one step after warm-up)."""
    if t.lr_decay_steps is not None:
        return t.lr_decay_steps
    return max(t.steps, t.warmup_steps + 1)


class WarmupCosine:
    """The learning-rate factor of step k-1 (LambdaLR passes k-1 for the k-th step). A class
    rather than a closure so that LambdaLR's state_dict can save it."""

    def __init__(self, warmup: int, decay: int, min_ratio: float):
        self.warmup, self.decay, self.min_ratio = warmup, decay, min_ratio

    @classmethod
    def of(cls, t: TrainConfig) -> WarmupCosine:
        return cls(t.warmup_steps, decay_steps(t), t.min_lr_ratio)

    def __call__(self, step: int) -> float:
        step += 1
        if self.warmup > 0 and step <= self.warmup:
            return step / self.warmup
        if step > self.decay:
            return self.min_ratio
        ratio = (step - self.warmup) / max(1, self.decay - self.warmup)
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return self.min_ratio + coeff * (1.0 - self.min_ratio)


def megatron_scheduler(optimizer, t: TrainConfig):
    """megatron-core's OptimizerParamScheduler with the same schedule as WarmupCosine,
    advanced by one step (the convention above)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.lr * t.min_lr_ratio,
        lr_warmup_steps=t.warmup_steps,
        lr_decay_steps=decay_steps(t),
        lr_decay_style="cosine",
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=decay_steps(t),  # megatron-core refuses a load where this changed
        wd_incr_style="constant",
    )
    scheduler.step(increment=1)
    return scheduler


def param_groups(model: torch.nn.Module, weight_decay: float, shape_of=None) -> list[dict]:
    """Weight decay on matrices only: norms' gains (and any biases) are not decayed.
    shape_of(p): a parameter's own shape where p.shape is not (ZeRO-3 partitions a parameter
    into an empty placeholder, which would put every parameter in the no-decay group)."""
    shape_of = shape_of or (lambda p: p.shape)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if len(shape_of(p)) == 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def unshare_adam_steps(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter its own Adam step tensor. Both megatron-core's distributed
    optimizer and DeepSpeed's universal load can restore torch Adam's per-parameter "step" as
    one tensor shared by many parameters; Adam increments it in place once per parameter,
    which breaks the bias correction after a resume."""
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
