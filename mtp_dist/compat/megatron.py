"""Fixes of megatron-core bugs, and uses of its private API, for every device.

- torch Adam's "step" on a fully-reshardable load of the distributed optimizer: the loader
  restores "step" separately but still copies it from the checkpoint's tensors (KeyError
  'step'). Without Apex/Transformer Engine the optimizer is torch's Adam on a GPU too.
- The optimizer state must exist before a save or load (torch Adam creates it lazily at the
  first step); megatron-core's own dummy-state initialiser is private.
- The scheduler's load_state_dict steps forward by the saved count from its current count
  instead of setting it.
- One expected warning of the memory-efficient fully-reshardable checkpoint format.
- A checkpoint save reports its writers' results through a multiprocessing Manager: a server
  process spawned at the first save, with default signal handling. SLURM signals every process
  of a job step, so the preemption signal (USR1) or scancel's TERM kills that server, and the
  very save the signal asks for fails (BrokenPipeError). Our saves are synchronous: the results
  are put and read in the saving process itself, so a plain in-process queue serves, with no
  server to kill.
- DDP's overlapped gradient reduction: whether a hook registers a gradient as ready is the
  bucket groups' `is_last_microbatch` flag (what `no_sync` toggles), set here directly for
  the sequential heads' in-forward backward; and the bucket boundaries follow from the
  buffer's private layout (parameters in reverse order, starts padded to 64 elements with
  the distributed optimizer), from which `first_bucket_size` computes a bucket size.
- The fully-reshardable optimizer checkpoint with more than one DDP bucket (megatron-core
  issue #504): the gathered "world" state drops the padding at the end of every bucket, but is
  sliced per parameter at the parameter's offset in the padded buffer, so every parameter
  after the first bucket gets another parameter's Adam state (and the last ones zeros) on save
  and on load. One bucket (no overlap) has no such padding. `keep_bucket_padding` makes every
  bucket but the last count its end padding as its own (its `numel_unpadded`), which both the
  save and the load read, so the world state keeps the padded layout the offsets refer to.
"""

from __future__ import annotations

import contextlib
import logging
import queue

import torch

from mtp_dist.compat import Upstream, check, replace

UPSTREAM = [
    Upstream(
        "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer."
        "_set_main_param_and_optimizer_states",
        'dst_tensors = {"param": main_param, **optim_state}',
    ),
    Upstream(
        "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer."
        "_init_optimizer_states_with_dummy_values",
        "def _init_optimizer_states_with_dummy_values(self)",
    ),
    Upstream(
        "megatron.core.optimizer_param_scheduler:OptimizerParamScheduler.load_state_dict",
        "self.step(increment=num_steps)",
    ),
    Upstream("megatron.core.dist_checkpointing.validation", "common state dict differs"),
    Upstream(
        "megatron.core.dist_checkpointing.strategies.filesystem_async:_get_write_results_queue",
        "_results_queue = ctx.Manager().Queue()",
    ),
    Upstream(
        "megatron.core.distributed.distributed_data_parallel:DistributedDataParallel.no_sync",
        "bucket_group.is_last_microbatch = False",
    ),
    Upstream(
        "megatron.core.distributed.param_and_grad_buffer:_ParamAndGradBucketGroup."
        "register_grad_ready",
        "if self.is_last_microbatch:",
    ),
    Upstream(
        "megatron.core.distributed.param_and_grad_buffer:_ParamAndGradBuffer.__init__",
        "return _pad(param_start_index, 64)",
    ),
    Upstream(
        "megatron.core.distributed.param_and_grad_buffer:_ParamAndGradBuffer.__init__",
        "bucket_size is not None and (param_end_index - bucket_start_index) >= bucket_size",
    ),
    Upstream(
        "megatron.core.distributed.param_and_grad_buffer:_ParamAndGradBuffer.__init__",
        "for param in params[::-1]:",
    ),
    Upstream(
        "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer."
        "get_parameter_state_dp_zero",
        "gets rid of the padding between buckets",
    ),
    Upstream(
        "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer."
        "sharded_param_state_fully_reshardable",
        "world_tensors[state_key][param_world_start:param_world_end]",
    ),
    Upstream(
        "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.__init__",
        "bucket.numel_unpadded for bucket in buffer.buckets",
    ),
]

_APPLIED = False


@contextlib.contextmanager
def grad_sync(ddp, enabled: bool):
    """Within: DDP's hooks register gradients as ready for the overlapped reduction (enabled)
    or only accumulate them (not enabled, as under `no_sync`); the previous state after."""
    groups = ddp.bucket_groups + ddp.expert_parallel_bucket_groups
    saved = [g.is_last_microbatch for g in groups]
    for g in groups:
        g.is_last_microbatch = enabled
    try:
        yield
    finally:
        for g, flag in zip(groups, saved, strict=True):
            g.is_last_microbatch = flag


def keep_bucket_padding(ddp) -> None:
    """Before the distributed optimizer is built (it records the buckets' sizes): see the
    module's docstring (issue #504)."""
    for buffer in ddp.buffers + ddp.expert_parallel_buffers:
        for bucket in buffer.buckets[:-1]:
            bucket.numel_unpadded = bucket.grad_data.numel()
        buffer.numel_unpadded = sum(b.numel_unpadded for b in buffer.buckets)


def first_bucket_size(params_in_order: list[torch.Tensor], count: int) -> int:
    """The DDP bucket_size (distributed optimizer) whose first bucket holds exactly the last
    `count` of the buffer's parameters (given in module order): megatron fills buckets from
    the last parameter backwards, starts each at a multiple of 64 elements, and closes a
    bucket after the parameter whose end reaches bucket_size. Ends grow strictly, so only
    the count-th parameter's end reaches it."""
    end = 0
    for p in params_in_order[::-1][:count]:
        end = -(-end // 64) * 64 + p.numel()
    return end


def apply() -> None:
    """Patch the distributed optimizer's state loading (idempotent; every device)."""
    global _APPLIED
    if _APPLIED:
        return
    check(UPSTREAM)
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer as Opt

    replace(
        Opt,
        "_set_main_param_and_optimizer_states",
        _keep_torch_adam_step(Opt._set_main_param_and_optimizer_states),
    )
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    # Synchronous saves only (mtp_dist never passes async_sharded_save): see the docstring.
    filesystem_async._results_queue = queue.Queue()
    logging.getLogger("megatron.core.dist_checkpointing.validation").addFilter(
        _ExpectedCommonStateDiff()
    )
    _APPLIED = True


def _keep_torch_adam_step(set_states):
    """Hide torch Adam's per-parameter "step" while the loader copies the other state tensors;
    the loader restores the step itself. A no-op for optimizers without a per-parameter step."""

    def wrapper(self, model_param, tensors):
        if "step" in tensors or self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return set_states(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[main_param]
        step = state.pop("step", None)
        try:
            return set_states(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    wrapper.mtp_dist_fix = True
    return wrapper


class _ExpectedCommonStateDiff(logging.Filter):
    """With the memory-efficient fully-reshardable format only DP rank 0 returns the
    optimizer's param_state, so dist_checkpointing warns on every save that the ranks' common
    state differs by exactly that key. Drop that one expected message; keep all others."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        expected = "common state dict differs" in msg and "[('optimizer', 'param_state')]" in msg
        return not (expected and "Mismatched keys: []" in msg)


def ensure_optimizer_state(optimizer) -> None:
    """Create torch Adam's lazily made state (needed to save before the first step, or to load
    into a fresh engine) with a step that changes nothing (lr and weight decay 0, zero
    gradients), then reset the step counts so that the first real step is step 1."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
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


def load_scheduler_state(scheduler, state: dict) -> None:
    """OptimizerParamScheduler.load_state_dict adds the saved step count to the current one;
    start from zero so that the loaded count is the count."""
    scheduler.num_steps = 0
    scheduler.load_state_dict(state)
