"""Uses of DeepSpeed's private API and workarounds of its limits, for every device.

- A universal checkpoint is chosen per load, but DeepSpeed reads the choice from its config
  object (`engine._config.load_universal_checkpoint`), which is fixed at initialize.
- DeepSpeed's ZeRO-3 hooks do not expect megatron-core's reentrant activation recompute:
  the trunk's layers are wrapped in torch's non-reentrant checkpoint instead.
- A ZeRO-3 parameter built under `deepspeed.zero.Init` is an empty placeholder; its real shape
  is `p.ds_shape`.
- ZeRO-1 with bf16 parameters and fp32 gradient accumulation makes DeepSpeed wrap the optimizer
  in BF16_Optimizer, whose engine refuses `coalesce_grad_reduction()` (which the engine needs):
  `selects_bf16_optimizer` mirrors that choice so that the config check can refuse it.
"""

from __future__ import annotations

from functools import partial

import torch

from mtp_dist.compat import Upstream, check

UPSTREAM = [
    Upstream(
        "deepspeed.runtime.engine:DeepSpeedEngine.load_universal_checkpoint",
        "return self._config.load_universal_checkpoint",
    ),
    Upstream("megatron.core.transformer.transformer_block:TransformerBlock", "layer("),
    # The choice selects_bf16_optimizer mirrors, and the refusal it avoids.
    Upstream(
        "deepspeed.runtime.engine:DeepSpeedEngine._do_optimizer_sanity_check",
        "model_dtype == torch.bfloat16 and grad_accum_dtype == torch.float32 and "
        "self.zero_optimization_stage(",
    ),
    Upstream(
        "deepspeed.runtime.engine:DeepSpeedEngine._do_optimizer_sanity_check",
        "not self.zero_cpu_offload()",
    ),
    Upstream(
        "deepspeed.runtime.engine:DeepSpeedEngine.coalesce_grad_reduction",
        "does not yet support optimizer wrapper",
    ),
    Upstream(
        "deepspeed.runtime.zero.partition_parameters:Init._convert_to_deepspeed_param",
        "param.ds_shape = param.shape",
    ),
]

_FP32_NAMES = ("torch.float32", "fp32", "float32", "float")
"""DeepSpeed's names of float32 in `data_types.grad_accum_dtype` (runtime/config.py DtypeEnum)."""


def set_universal_load(engine, universal: bool) -> None:
    """Make the next engine.load_checkpoint read a universal checkpoint (or not)."""
    check(UPSTREAM[:1])
    engine._config.load_universal_checkpoint = universal


def checkpoint_layers(block) -> None:
    """Recompute each layer of a megatron-core TransformerBlock with torch's non-reentrant
    checkpoint (the block calls `layer(...)`, which goes through the instance's forward), and
    switch megatron-core's own recompute off."""
    check(UPSTREAM[1:2])
    config = block.config
    config.recompute_granularity = None
    config.recompute_method = None
    config.recompute_num_layers = None
    for layer in block.layers:
        layer.forward = partial(
            torch.utils.checkpoint.checkpoint, layer.forward, use_reentrant=False
        )


def full_shape(p: torch.Tensor) -> torch.Size:
    """The parameter's own shape, also when ZeRO-3 has partitioned it away (p.shape is then
    the empty placeholder's)."""
    check(UPSTREAM[5:])
    return getattr(p, "ds_shape", p.shape)


def selects_bf16_optimizer(ds_config: dict) -> bool:
    """Whether DeepSpeed would wrap the optimizer in BF16_Optimizer for this (completed) config
    dict: ZeRO-1, bf16 parameters, fp32 gradient accumulation and no optimizer offload to the
    CPU (`DeepSpeedEngine._do_optimizer_sanity_check`). Called at config time, so it does not
    import DeepSpeed to check UPSTREAM[2:5]: tests/test_compat.py and a test that builds the
    engine (tests/test_deepspeed.py) do."""
    zero = ds_config.get("zero_optimization", {})
    offload = (zero.get("offload_optimizer") or {}).get("device")
    accum = ds_config.get("data_types", {}).get("grad_accum_dtype")
    return (
        zero.get("stage") == 1
        and bool(ds_config.get("bf16", {}).get("enabled"))
        and accum in _FP32_NAMES
        and offload != "cpu"
    )
