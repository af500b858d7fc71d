"""megatron-core engine: DistributedDataParallel, the distributed optimizer (AdamW state sharded
over data-parallel ranks), the cosine schedule, and dist_checkpointing (reshardable over TP, PP
and DP)."""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from mtp_dist.compat import megatron as fixes
from mtp_dist.config import Config
from mtp_dist.distributed import ParallelDims, collective_device
from mtp_dist.engines.base import TrainStepResult
from mtp_dist.engines.optim import megatron_scheduler, unshare_adam_steps
from mtp_dist.model import weights
from mtp_dist.model.model import MTPModel
from mtp_dist.run_plan import RunPlan
from mtp_dist.schedule import StepResult, run_schedule


def checkpoint_metadata(on_gpu: bool) -> dict:
    """fully_reshardable: the optimizer state is saved per parameter in model space, so a
    checkpoint loads at another TP/PP/DP layout. The memory-efficient variant gathers over
    gloo, which is also the only way on CPU."""
    return {
        "distrib_optim_sharding_type": "fully_reshardable",
        "distrib_optim_fully_reshardable_mem_efficient": not on_gpu,
    }


HEADS_PREFIXES = ("heads.", "output_layer.")
"""The parameters whose gradients the sequential heads produce inside the forward (the
unembedding when it is not tied to the input embedding, which the trunk's backward reaches)."""


def heads_grad_sync(ddp: DistributedDataParallel, is_last: bool):
    """Around one microbatch's forward (schedule.run_schedule's forward_grad_sync).

    Megatron DDP registers a gradient as ready for the overlapped bucket reduction only while
    grad sync is on, which `no_sync` turns off. The sequential heads run their backward inside
    the forward, where megatron-core's schedules do not keep that state right for them: the
    1F1B schedule runs the last microbatch's forward with grad sync still off (it turns it on
    just before that microbatch's backward), so the heads' gradients were never registered and
    a bucket that also held trunk parameters never completed (megatron asserts at the next
    step). Here grad sync is on during the last microbatch's forward and off during the
    others', whatever the schedule, so each head's parameters (and the unembedding's and the
    final norm's, whose hooks fire once per head) register once per step, in the last
    microbatch, after every microbatch's gradients have been accumulated: megatron counts each
    parameter's hook calls in the first step and, from the second on, starts a bucket's
    reduction when every parameter in it has reached its count. With heads_bucket_size the
    heads' bucket thus starts reducing when the last head's backward ends, overlapping the
    trunk's backward of the last microbatch. The trunk's own hooks fire in the schedule's
    backward, after the previous state is restored."""
    return fixes.grad_sync(ddp, enabled=is_last)


def heads_bucket_size(model: torch.nn.Module) -> int | None:
    """A DDP bucket size that makes the heads' parameters exactly the first bucket (megatron
    fills buckets from the last parameter backwards: the unembedding, the final norm and the
    heads come first), so their reduction does not wait for trunk layers sharing a bucket.
    The trunk's buckets are then as large as the heads' (n layers and the unembedding: a few
    trunk layers' worth). None (megatron's default size) if the heads do not come last.
    With a pipeline the heads' stage is not the first, where megatron makes one bucket
    anyway: its reduction, after its last backward, is not on the critical path."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    count = sum(1 for name, _ in named if name.startswith(HEADS_PREFIXES))
    tail = named[len(named) - count :]
    if count == 0 or not all(name.startswith(HEADS_PREFIXES) for name, _ in tail):
        return None
    return fixes.first_bucket_size([p for _, p in named], count)


class MegatronEngine:
    @classmethod
    def check_config(cls, cfg: Config, plan: RunPlan) -> None:
        """Everything megatron-core needs is checked by the config and the plan."""

    @classmethod
    def model_construction(cls, cfg: Config, plan: RunPlan, dims: ParallelDims):
        """Each rank builds its whole TP/PP shard: the distributed optimizer shards only the
        optimizer state."""
        return contextlib.nullcontext()

    @classmethod
    def init_weights(cls, cfg: Config, dims: ParallelDims, model: MTPModel, source=None) -> None:
        weights.init_weights(model, cfg.train.seed, source)

    def __init__(self, cfg: Config, plan: RunPlan, dims: ParallelDims, model: MTPModel):
        self.cfg = cfg
        self.dims = dims
        self.model = model
        tcfg = model.config
        self.overlap_param_gather = plan.overlap_param_gather
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=plan.overlap_grad_reduce,
            overlap_param_gather=plan.overlap_param_gather,
            bucket_size=heads_bucket_size(model) if plan.overlap_grad_reduce else None,
            use_distributed_optimizer=True,
            check_for_nan_in_grad=False,
        )
        self.ddp = DistributedDataParallel(config=tcfg, ddp_config=ddp_config, module=model)
        # Several buckets (overlap) would corrupt the fully-reshardable optimizer checkpoint.
        fixes.keep_bucket_padding(self.ddp)
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
            bf16=plan.dtype == "bf16",
            params_dtype=tcfg.params_dtype,
            use_distributed_optimizer=True,
        )
        self.optimizer = get_megatron_optimizer(opt_config, [self.ddp])
        self.scheduler = megatron_scheduler(self.optimizer, t)
        tcfg.no_sync_func = self.ddp.no_sync
        tcfg.finalize_model_grads_func = finalize_model_grads
        tcfg.grad_scale_func = None
        self.forward_grad_sync = (
            functools.partial(heads_grad_sync, self.ddp) if plan.overlap_grad_reduce else None
        )

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _grads_finite(self) -> bool:
        """All ranks agree whether every gradient is finite (one reduction, one host read)."""
        bad = torch.zeros(1, device=collective_device())
        for buf in self.ddp.buffers:
            bad += (~torch.isfinite(buf.grad_data.sum())).to(bad.device, bad.dtype)
        dist.all_reduce(bad)
        return bad.item() == 0

    def forward_backward(self, microbatches) -> StepResult:
        """The step's gradients, reduced over data-parallel ranks into the grad buffers."""
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.ddp.train()
        return run_schedule(
            self.ddp,
            microbatches,
            self.cfg.model.seq_length,
            forward_grad_sync=self.forward_grad_sync,
        )

    def sync_params(self) -> None:
        """With overlap_param_gather the optimizer step leaves each rank's parameters
        partly stale until the next forward gathers them: gather them now (for a save)."""
        if self.overlap_param_gather:
            self.ddp.start_param_sync(force_sync=True)

    def train_step(self, microbatches) -> TrainStepResult:
        result = self.forward_backward(microbatches)
        lr = self.lr
        applied, norm = False, float("nan")
        if self._grads_finite():
            applied, grad_norm, _ = self.optimizer.step()
            if grad_norm is not None:
                norm = float(grad_norm)
        # The schedule follows the step count, skipped steps included, so that step k always
        # runs at the schedule's value for k (the data advances on a skipped step too).
        self.scheduler.step(increment=1)
        return TrainStepResult.of(result, norm, skipped=not applied, lr=lr)

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

    def save(self, directory: str) -> None:
        self.sync_params()
        fixes.ensure_optimizer_state(self.optimizer)
        dist_checkpointing.save(self._sharded_state_dict(is_loading=False), directory)

    def load(self, directory: str, load_optimizer: bool = True) -> None:
        if load_optimizer:
            fixes.ensure_optimizer_state(self.optimizer)
        template = self._sharded_state_dict(is_loading=True, with_optimizer=load_optimizer)
        state = dist_checkpointing.load(template, directory)
        self.model.load_state_dict(state["model"])
        if load_optimizer:
            with torch.no_grad():
                self.optimizer.load_state_dict(state["optimizer"])
            for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
                unshare_adam_steps(opt.optimizer)
            fixes.load_scheduler_state(self.scheduler, state["scheduler"])
        # The distributed optimizer keeps fp32 main params for bf16 models: refresh them.
        if hasattr(self.optimizer, "reload_model_params"):
            self.optimizer.reload_model_params()

    @staticmethod
    def load_full_weights(directory: str | os.PathLike, model: MTPModel) -> None:
        """dist_checkpointing reshards the saved model to this process's (TP1 x PP1) model."""
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(directory))
        model.load_state_dict(state["model"])
