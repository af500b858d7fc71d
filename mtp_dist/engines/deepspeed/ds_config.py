"""What DeepSpeed is told: its config dict (cfg.deepspeed.config completed from train.*, a
contradiction between the two refused by name) and the `mpu` that gives it megatron-core's
process groups."""

from __future__ import annotations

import json

import torch.distributed as dist
from megatron.core import parallel_state

from mtp_dist.config import Config, ConfigError
from mtp_dist.distributed import ParallelDims
from mtp_dist.run_plan import RunPlan

# (key in the DeepSpeed JSON, key in train.*) that must agree.
_BATCH_KEYS = (
    ("train_micro_batch_size_per_gpu", "train.micro_batch_size"),
    ("train_batch_size", "train.global_batch_size"),
    ("gradient_accumulation_steps", "train.global_batch_size / (micro_batch_size * dp)"),
)


class MegatronMPU:
    """The `mpu` DeepSpeed asks for, from megatron-core's parallel_state.

    model-parallel = tensor x pipeline (the gradient norm is summed over it, and checkpoint
    files are named by its rank); tensor-parallel = the shards that
    `p.tensor_model_parallel` marks (replicated parameters count once in the norm)."""

    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(
        parallel_state.get_tensor_model_parallel_world_size
    )
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(parallel_state.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(
        parallel_state.get_pipeline_model_parallel_world_size
    )
    get_data_parallel_rank = staticmethod(parallel_state.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(parallel_state.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(parallel_state.get_data_parallel_group)
    get_model_parallel_group = staticmethod(parallel_state.get_model_parallel_group)

    @staticmethod
    def get_model_parallel_rank() -> int:
        return dist.get_rank(group=parallel_state.get_model_parallel_group())

    @staticmethod
    def get_model_parallel_world_size() -> int:
        return dist.get_world_size(group=parallel_state.get_model_parallel_group())


def build_ds_config(cfg: Config, plan: RunPlan, on_gpu: bool) -> dict:
    """DeepSpeed's config dict: cfg.deepspeed.config (if given) completed from cfg.train; a
    contradiction between the two is a ConfigError naming both keys."""
    t = cfg.train
    ds: dict = {}
    path = cfg.deepspeed.config
    if path is not None:
        try:
            with open(path) as f:
                ds = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"deepspeed.config={path!r} cannot be read as JSON: {e}") from e
        wanted = (t.micro_batch_size, t.global_batch_size, plan.num_microbatches)
        for (ds_key, cfg_key), value in zip(_BATCH_KEYS, wanted, strict=True):
            if ds_key in ds and ds[ds_key] != value:
                raise ConfigError(
                    f"deepspeed.config {path}: {ds_key}={ds[ds_key]} contradicts {cfg_key}="
                    f"{value}; remove {ds_key} from the JSON or change {cfg_key}"
                )
        stage = ds.get("zero_optimization", {}).get("stage")
        if stage is not None and stage != cfg.deepspeed.zero_stage:
            raise ConfigError(
                f"deepspeed.config {path}: zero_optimization.stage={stage} contradicts "
                f"deepspeed.zero_stage={cfg.deepspeed.zero_stage}; make them equal"
            )
    bf16 = ds.get("bf16", {}).get("enabled")
    if bf16 is not None and bf16 != (plan.dtype == "bf16"):
        # DeepSpeed would cast the parameters behind megatron-core's back; under ZeRO-3 they
        # are built in train.dtype's, which DeepSpeed must then expect.
        raise ConfigError(
            f"deepspeed.config {path}: bf16.enabled={str(bf16).lower()} contradicts train.dtype="
            f"{t.dtype} ({plan.dtype} here); remove bf16 from the JSON or change train.dtype"
        )
    if ds.get("fp16", {}).get("enabled"):
        raise ConfigError(
            f"deepspeed.config {path}: fp16 is not supported (the sequential heads would need "
            "the dynamic loss scale up front); use bf16"
        )
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["gradient_accumulation_steps"] = plan.num_microbatches
    ds["train_batch_size"] = t.global_batch_size
    ds.setdefault("gradient_clipping", t.grad_clip)
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = cfg.deepspeed.zero_stage
    overlap = zero.get("overlap_comm")
    if (
        overlap is not None
        and t.overlap_grad_reduce is not None
        and overlap != t.overlap_grad_reduce
    ):
        raise ConfigError(
            f"deepspeed.config {path}: zero_optimization.overlap_comm={str(overlap).lower()} "
            f"contradicts train.overlap_grad_reduce={str(t.overlap_grad_reduce).lower()}; "
            "remove one of them"
        )
    if overlap is None:
        zero["overlap_comm"] = plan.overlap_grad_reduce
    ds.setdefault("bf16", {}).setdefault("enabled", plan.dtype == "bf16")
    # torch's AdamW as the client optimizer is "untested" in DeepSpeed's eyes.
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 2**31 - 1)
    if on_gpu and "optimizer" not in ds:
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": 1e-8},
        }
    return ds


def runtime_config(cfg: Config, plan: RunPlan, dims: ParallelDims) -> dict:
    """The config deepspeed.initialize (and zero.Init) get: the engine accumulates, so
    DeepSpeed sees the rank's whole share of the global batch as one microbatch."""
    ds = build_ds_config(cfg, plan, on_gpu=dims.device.type == "cuda")
    ds["train_micro_batch_size_per_gpu"] = cfg.train.global_batch_size // dims.dp
    ds["gradient_accumulation_steps"] = 1
    return ds
