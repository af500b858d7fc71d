"""megatron-core engine: DistributedDataParallel, the distributed optimizer (AdamW state sharded
over data-parallel ranks), the cosine schedule, and dist_checkpointing (reshardable over TP, PP
and DP)."""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from mtp_dist.config import Config
from mtp_dist.distributed import ParallelDims
from mtp_dist.engines.base import TrainStepResult
from mtp_dist.model.model import MTPModel
from mtp_dist.pipeline import StepResult, run_schedule


class _ExpectedCommonStateDiff(logging.Filter):
    """With the memory-efficient fully-reshardable format only DP rank 0 returns the
    optimizer's param_state, so dist_checkpointing warns on every save that the ranks' common
    state differs by exactly that key. Drop that one expected message; keep all others."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        expected = "common state dict differs" in msg and "[('optimizer', 'param_state')]" in msg
        return not (expected and "Mismatched keys: []" in msg)


logging.getLogger("megatron.core.dist_checkpointing.validation").addFilter(
    _ExpectedCommonStateDiff()
)


def checkpoint_metadata(on_gpu: bool) -> dict:
    """fully_reshardable: the optimizer state is saved per parameter in model space, so a
    checkpoint loads at another TP/PP/DP layout. The memory-efficient variant gathers over
    gloo, which is also the only way on CPU."""
    return {
        "distrib_optim_sharding_type": "fully_reshardable",
        "distrib_optim_fully_reshardable_mem_efficient": not on_gpu,
    }


def build_scheduler(optimizer, cfg: Config) -> OptimizerParamScheduler:
    """Linear warm-up then cosine decay to lr * min_lr_ratio. Advanced by one so that step k
    (1-based) runs at the schedule's value for k: the first step does not run at lr 0."""
    t = cfg.train
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.lr * t.min_lr_ratio,
        lr_warmup_steps=t.warmup_steps,
        lr_decay_steps=max(t.steps, t.warmup_steps + 1),
        lr_decay_style="cosine",
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=max(t.steps, 1),
        wd_incr_style="constant",
    )
    scheduler.step(increment=1)
    return scheduler


def _unshare_adam_steps(optimizer) -> None:
    """megatron-core restores torch Adam's per-parameter "step" as one tensor shared by every
    parameter; Adam increments it in place once per parameter, which breaks the bias
    correction after a resume. Give each parameter its own copy."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in opt.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


class MegatronEngine:
    def __init__(self, cfg: Config, dims: ParallelDims, model: MTPModel):
        self.cfg = cfg
        self.dims = dims
        self.model = model
        tcfg = model.config
        bf16 = tcfg.bf16
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=True,
            check_for_nan_in_grad=False,
        )
        self.ddp = DistributedDataParallel(config=tcfg, ddp_config=ddp_config, module=model)
        t = cfg.train
        opt_config = OptimizerConfig(
            optimizer="adam",
            lr=t.lr,
            min_lr=t.lr * t.min_lr_ratio,
            weight_decay=t.weight_decay,
            adam_beta1=t.beta1,
            adam_beta2=t.beta2,
            adam_eps=1e-8,
            clip_grad=t.grad_clip,
            bf16=bf16,
            params_dtype=tcfg.params_dtype,
            use_distributed_optimizer=True,
        )
        self.optimizer = get_megatron_optimizer(opt_config, [self.ddp])
        self.scheduler = build_scheduler(self.optimizer, cfg)
        tcfg.no_sync_func = self.ddp.no_sync
        tcfg.finalize_model_grads_func = finalize_model_grads
        tcfg.grad_scale_func = None

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _grads_finite(self) -> bool:
        """All ranks agree whether every gradient is finite (one reduction)."""
        bad = torch.zeros(1, device=self.dims.device)
        for buf in self.ddp.buffers:
            if not torch.isfinite(buf.grad_data.sum()):
                bad += 1
        dist.all_reduce(bad)
        return bad.item() == 0

    def train_step(self, microbatches) -> TrainStepResult:
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.ddp.train()
        result = run_schedule(self.ddp, microbatches, self.cfg.model.seq_length)
        lr = self.lr
        if not self._grads_finite():
            return TrainStepResult(result, float("nan"), True, lr)
        ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            return TrainStepResult(result, float("nan"), True, lr)
        self.scheduler.step(increment=1)
        norm = float(grad_norm) if grad_norm is not None else float("nan")
        return TrainStepResult(result, norm, not math.isfinite(norm), lr)

    def eval_step(self, microbatches) -> StepResult:
        self.ddp.eval()
        result = run_schedule(self.ddp, microbatches, self.cfg.model.seq_length, forward_only=True)
        self.ddp.train()
        return result

    def _sharded_state_dict(self, is_loading: bool, with_optimizer: bool = True) -> dict:
        model_sd = self.model.sharded_state_dict()
        state = {"model": model_sd}
        if with_optimizer:
            state["optimizer"] = self.optimizer.sharded_state_dict(
                model_sd,
                is_loading=is_loading,
                metadata=checkpoint_metadata(self.dims.device.type == "cuda"),
            )
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def _ensure_optimizer_state(self) -> None:
        """torch Adam creates its state lazily, but megatron-core's checkpoint code needs it
        (before the first step: saving at step 0, or loading into a fresh engine). Create it
        with a step that changes nothing (lr and weight decay 0, zero gradients), then reset the
        step counts so that the first real step is step 1."""
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            if opt.optimizer.state:
                continue
            saved = [(g["lr"], g["weight_decay"]) for g in opt.optimizer.param_groups]
            for g in opt.optimizer.param_groups:
                g["lr"], g["weight_decay"] = 0.0, 0.0
            opt._init_optimizer_states_with_dummy_values()
            for g, (lr, wd) in zip(opt.optimizer.param_groups, saved, strict=True):
                g["lr"], g["weight_decay"] = lr, wd
            for state in opt.optimizer.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = torch.zeros_like(state["step"])

    def save(self, directory: str) -> None:
        self._ensure_optimizer_state()
        dist_checkpointing.save(self._sharded_state_dict(is_loading=False), directory)

    def load(self, directory: str, load_optimizer: bool = True) -> None:
        if load_optimizer:
            self._ensure_optimizer_state()
        template = self._sharded_state_dict(is_loading=True, with_optimizer=load_optimizer)
        state = dist_checkpointing.load(template, directory)
        self.model.load_state_dict(state["model"])
        if load_optimizer:
            with torch.no_grad():
                self.optimizer.load_state_dict(state["optimizer"])
            _unshare_adam_steps(self.optimizer)
            self.scheduler.num_steps = 0  # load_state_dict adds the saved count to it
            self.scheduler.load_state_dict(state["scheduler"])
        # The distributed optimizer keeps fp32 main params for bf16 models: refresh them.
        if hasattr(self.optimizer, "reload_model_params"):
            self.optimizer.reload_model_params()
