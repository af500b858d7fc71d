"""The GPU path, checked on CPU where it can be: every collective mtp_dist issues takes its
tensors from the device of the group's backend (NCCL rejects CPU tensors), the fused softmax
is off without its kernels, and upstream fixes apply on every device."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from mtp_dist import distributed
from mtp_dist.config import ModelConfig


class Called(Exception):
    pass


@pytest.fixture
def collectives_on_meta(monkeypatch):
    """Backends that want "meta" tensors: a collective on any other device is a mistake."""
    seen = []

    def record(tensor, *args, **kwargs):
        seen.append(tensor.device.type)
        raise Called

    meta = lambda group=None: torch.device("meta")  # noqa: E731
    for module in ("mtp_dist.trainer", "mtp_dist.engines.megatron"):
        monkeypatch.setattr(f"{module}.collective_device", meta)
    monkeypatch.setattr(dist, "all_reduce", record)
    return seen


def test_collective_device_follows_the_backend(megatron_1proc, monkeypatch):
    assert distributed.collective_device() == torch.device("cpu")  # gloo
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert distributed.collective_device() == torch.device("cuda", 3)


def test_trainer_collectives_use_the_backend_device(collectives_on_meta):
    from mtp_dist.trainer import Trainer

    trainer = object.__new__(Trainer)
    trainer.stop_signal = None
    trainer.cfg = SimpleNamespace(model=SimpleNamespace(n_future_tokens=2))
    trainer.dims = SimpleNamespace(is_last_stage=True, tp_rank=0, dp=1)
    with pytest.raises(Called):
        trainer._should_stop()
    with pytest.raises(Called):
        trainer._reduce_losses(1.0, [0.5, 0.5])
    assert collectives_on_meta == ["meta", "meta"]


def test_megatron_engine_finiteness_check_uses_the_backend_device(collectives_on_meta):
    from mtp_dist.engines.megatron import MegatronEngine

    engine = object.__new__(MegatronEngine)
    engine.ddp = SimpleNamespace(buffers=[SimpleNamespace(grad_data=torch.zeros(4))])
    with pytest.raises(Called):
        engine._grads_finite()
    assert collectives_on_meta == ["meta"]


def test_fused_softmax_is_off_on_gpu_without_its_kernels():
    from mtp_dist.model.spec import fused_softmax_kernels_available, transformer_config

    assert not fused_softmax_kernels_available()  # neither Apex nor megatron's kernels here
    gpu = transformer_config(ModelConfig(), dtype=torch.bfloat16, cpu=False)
    assert gpu.masked_softmax_fusion is False and gpu.bf16


def test_upstream_fixes_are_applied_whatever_the_device(megatron_1proc):
    """distributed.prepare_device (distributed.init's, single_process's) applies compat.megatron
    (a bug fix) outside the no-GPU branch."""
    import inspect

    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    assert getattr(DistributedOptimizer._set_main_param_and_optimizer_states, "mtp_dist_fix", 0)
    assert "prepare_device(" in inspect.getsource(distributed.init)
    assert "prepare_device(" in inspect.getsource(distributed.single_process)
    lines = inspect.getsource(distributed.prepare_device).splitlines()
    indent = lambda text: next(ln for ln in lines if text in ln).index(text.strip()[0])  # noqa: E731
    # The fix sits at the level of `if use_cuda:`, not inside either branch.
    assert indent("megatron_fixes.apply()") == indent("if use_cuda:")
    assert indent("cpu.apply()") > indent("if use_cuda:")
