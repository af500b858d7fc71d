"""Shims that let megatron-core 0.16 run on a machine without a GPU.

megatron-core assumes CUDA in a few places (the RNG tracker, `torch.cuda.current_device()` used
as a device, "cuda" literals in the pipeline schedules and the optimizer). `apply()` patches
exactly those places; it is called once, by `distributed.init`, and only when no GPU is present.
Every shim first checks that the upstream code it replaces still looks as expected (UPSTREAM),
so an upgrade that moves things fails loudly instead of silently running unpatched code.
Fixes of upstream bugs are not shims: they live in the sibling modules and apply on every
device.
"""

from __future__ import annotations

import torch

from mtp_dist.compat import Upstream, check, replace

_APPLIED = False


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _cpu_tracker_add(self, name, seed):
    """CudaRNGStatesTracker.add on the CPU generator: same bookkeeping, CPU states."""
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"rng state {name} already exists")
    orig = torch.get_rng_state()
    torch.random.default_generator.manual_seed(seed)
    self.states_[name] = torch.get_rng_state()
    torch.set_rng_state(orig)


def _cpu_current_device():
    return "cpu"


def _cpu_synchronize(device=None):
    return None


class _CpuCudaNamespace:
    """Stands in for `torch` inside modules that write `device="cuda"`: every tensor factory
    called with a CUDA device is redirected to the CPU."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        attr = getattr(self._real, name)
        if name in _FACTORIES:
            return _on_cpu(attr)
        return attr


_FACTORIES = {"zeros", "ones", "empty", "tensor", "full", "arange", "zeros_like", "ones_like"}


def _on_cpu(fn):
    def wrapper(*args, **kwargs):
        dev = kwargs.get("device")
        if dev is not None and "cuda" in str(dev):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    return wrapper


def _with_cuda_type_names(fn):
    """Run fn while `Tensor.type()` (no arguments) names CPU tensors as their CUDA twins:
    the distributed optimizer sorts parameters by comparing against "torch.cuda.*Tensor"."""
    real_type = torch.Tensor.type

    def cuda_named_type(self, *args, **kwargs):
        name = real_type(self, *args, **kwargs)
        if not args and not kwargs and isinstance(name, str) and name.startswith("torch."):
            if not name.startswith("torch.cuda."):
                return name.replace("torch.", "torch.cuda.", 1)
        return name

    def wrapper(*args, **kwargs):
        torch.Tensor.type = cuda_named_type
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.type = real_type

    return wrapper


def _tensor_cuda_is_identity(fn):
    """Run fn while `Tensor.cuda()` returns the tensor itself: with tied embeddings and a
    pipeline, the language module moves the last stage's copy of the embedding to "the GPU"
    before the all-reduce that makes both copies equal."""

    def wrapper(*args, **kwargs):
        real_cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *a, **k: self
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.cuda = real_cuda

    return wrapper


MEGATRON_UPSTREAM = [
    Upstream("megatron.core.utils", 'device="cuda"'),
    Upstream("megatron.core.optimizer.clip_grads", "cuda"),
    Upstream(
        "megatron.core.optimizer.clip_grads:clip_grad_by_total_norm_fp32", "torch.cuda.FloatTensor"
    ),
    Upstream("megatron.core.optimizer.optimizer", "cuda"),
    Upstream("megatron.core.optimizer.distrib_optimizer", "cuda"),
    Upstream(
        "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer."
        "_build_model_and_main_param_groups",
        "model_param.type() == 'torch.cuda.FloatTensor'",
    ),
    Upstream("megatron.core.tensor_parallel.random:_get_cuda_rng_state", "torch.cuda"),
    Upstream("megatron.core.tensor_parallel.random:_set_cuda_rng_state", "_cuda_setRNGState"),
    Upstream(
        "megatron.core.tensor_parallel.random:CudaRNGStatesTracker.add",
        "torch.cuda.get_rng_state()",
    ),
    Upstream("megatron.core.pipeline_parallel.schedules", 'device="cuda"'),
    Upstream(
        "megatron.core.models.common.language_module.language_module:LanguageModule."
        "setup_embeddings_and_output_layer",
        "weight.data = weight.data.cuda()",
    ),
]
DEEPSPEED_UPSTREAM = [Upstream("deepspeed.comm.torch:build_shm_op", "ShareMemCommBuilder")]
UPSTREAM = MEGATRON_UPSTREAM + DEEPSPEED_UPSTREAM


def apply() -> None:
    """Patch megatron-core for CPU execution. Idempotent; refuses to run when CUDA is present."""
    global _APPLIED
    if _APPLIED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("compat.cpu.apply() is for machines without a GPU")
    check(MEGATRON_UPSTREAM)
    from megatron.core import utils
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random

    replace(random, "_get_cuda_rng_state", _cpu_get_rng_state)
    replace(random, "_set_cuda_rng_state", _cpu_set_rng_state)
    replace(random.CudaRNGStatesTracker, "add", _cpu_tracker_add)
    # ~30 places use torch.cuda.current_device() as a device argument.
    torch.cuda.current_device = _cpu_current_device
    # dist_checkpointing synchronises the device before writing; nothing to wait for on CPU.
    torch.cuda.synchronize = _cpu_synchronize
    for module in (schedules, clip_grads, optimizer, distrib_optimizer, utils):
        module.torch = _CpuCudaNamespace(torch)
    clip = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    replace(clip_grads, "clip_grad_by_total_norm_fp32", clip)
    optimizer.clip_grad_by_total_norm_fp32 = clip  # the name optimizer.py imported
    opt = distrib_optimizer.DistributedOptimizer
    build = opt._build_model_and_main_param_groups
    replace(opt, "_build_model_and_main_param_groups", staticmethod(_with_cuda_type_names(build)))
    setup = LanguageModule.setup_embeddings_and_output_layer
    replace(LanguageModule, "setup_embeddings_and_output_layer", _tensor_cuda_is_identity(setup))
    _APPLIED = True


def apply_deepspeed() -> None:
    """Prepare DeepSpeed for a CPU-only run: pick its CPU accelerator and skip the shared-memory
    comm op that its CPU backend JIT-compiles at init (50-75 s cold; only
    inference_all_reduce uses it, training never does). Call before deepspeed.initialize."""
    import importlib
    import os

    if torch.cuda.is_available():
        raise RuntimeError("compat.cpu.apply_deepspeed() is for machines without a GPU")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # Not `import deepspeed.comm.torch as ...`: deepspeed.comm's `torch` attribute is torch.
    ds_torch = importlib.import_module("deepspeed.comm.torch")

    if getattr(ds_torch.build_shm_op, "skipped_on_cpu", False):
        return
    check(DEEPSPEED_UPSTREAM)

    def no_shm_op():
        return None

    no_shm_op.skipped_on_cpu = True
    replace(ds_torch, "build_shm_op", no_shm_op)  # the guard reads upstream's through it
