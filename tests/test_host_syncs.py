"""No host synchronisation inside the microbatch loop (one process, CPU).

A CPU has no device to wait for, so the syncs are counted where a GPU would stall: every op
that reads a tensor's value on the host (`item()`, `bool()`, `float()`, `torch.allclose`,
`torch.equal` all reach aten's _local_scalar_dense / equal / is_nonzero, seen by a dispatch
mode), and every `tolist()` / `numpy()` / `cpu()` (a device-to-host copy on a GPU; on CPU they
do not dispatch, so they are counted by wrapping them). The schedule over several microbatches
must make exactly one read (the step's losses, in one transfer); an engine's whole train step
must make as many reads with 4 microbatches as with 1.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mtp_dist import config as C
from mtp_dist import engines
from mtp_dist.model.model import build_model
from mtp_dist.model.weights import init_weights
from mtp_dist.run_plan import resolve
from mtp_dist.schedule import run_schedule

aten = torch.ops.aten
READS = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default}
COPIES = ("tolist", "numpy", "cpu")


class HostReads(TorchDispatchMode):
    """Counts host reads of tensor values, each with the line of mtp_dist or megatron that made
    it (for the failure message)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.reads: list[str] = []
        for name in COPIES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counted(name, original))

    def _where(self, what: str) -> None:
        frames = [f for f in traceback.extract_stack() if "tests/" not in f.filename]
        code = ("mtp_dist/", "megatron/", "deepspeed/", "torch/optim/")
        f = ([f for f in frames if any(c in f.filename for c in code)] or frames)[-1]
        self.reads.append(f"{what} at {f.filename.split('site-packages/')[-1]}:{f.lineno}")

    def _counted(self, name, original):
        def counted(tensor, *args, **kwargs):
            self._where(name)
            return original(tensor, *args, **kwargs)

        return counted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in READS:
            self._where(str(func))
        return func(*args, **(kwargs or {}))


def tiny(mode: str, num_microbatches: int) -> C.Config:
    return C.load(
        "configs/tiny.yaml",
        [
            "data.synthetic=true",
            "model.n_future_tokens=4",
            f"model.head_backward={mode}",
            "train.micro_batch_size=1",
            f"train.global_batch_size={num_microbatches}",
            "train.overlap_grad_reduce=false",
            "logging.wandb=false",
        ],
    )


def microbatches(cfg: C.Config, count: int) -> list[dict]:
    m = cfg.model
    gen = torch.Generator().manual_seed(0)
    shape = (1, m.seq_length + m.n_future_tokens)
    return [{"tokens": torch.randint(0, m.vocab_size, shape, generator=gen)} for _ in range(count)]


@pytest.mark.parametrize("mode", ["sequential", "joint"])
def test_the_schedule_reads_the_host_once_per_step(megatron_1proc, monkeypatch, mode):
    cfg = tiny(mode, 4)
    model = build_model(cfg.model)
    init_weights(model, seed=1)
    batches = microbatches(cfg, 4)
    reads = HostReads(monkeypatch)
    with reads:
        result = run_schedule(model, batches, cfg.model.seq_length)
    assert len(reads.reads) == 1 and "tolist at" in reads.reads[0], reads.reads
    assert "mtp_dist/schedule.py" in reads.reads[0], reads.reads
    assert len(result.head_losses) == 4


@pytest.mark.parametrize("engine", ["megatron", "deepspeed"])
def test_an_engine_step_reads_the_host_independently_of_the_microbatches(
    megatron_1proc, monkeypatch, engine
):
    """Nothing is read per microbatch. mtp_dist's own reads per step: the losses, and the
    finiteness check (megatron) or the gradient norm (DeepSpeed). The libraries read too, once
    per step: the gradient norm (megatron-core's clip_grads, and its l2-norm fallback without
    Apex), the step's applied flag (DeepSpeed), and torch's CPU AdamW one step counter per
    parameter (a CPU-only cost: its foreach/fused GPU paths keep the counters on the host)."""
    counts = {}
    for count in (1, 4):
        cfg = tiny("sequential", count)
        cfg.engine = engine
        plan = resolve(cfg, 1, on_gpu=False)
        model = engines.build_model(cfg, plan, megatron_1proc)
        wrapped = engines.build_engine(cfg, plan, megatron_1proc, model)
        batches = microbatches(cfg, count)
        wrapped.train_step(batches)  # first-step set-up (buffers, optimizer state) aside
        reads = HostReads(monkeypatch)
        with reads:
            wrapped.train_step(batches)
        monkeypatch.undo()
        counts[count] = reads.reads
    assert len(counts[4]) == len(counts[1]), counts
    for reads in counts.values():
        own = [r for r in reads if "mtp_dist/" in r]
        assert len(own) == 2 and "mtp_dist/schedule.py" in own[0], own
