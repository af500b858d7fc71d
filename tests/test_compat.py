"""The upstream code that mtp_dist/compat patches or relies on is still there, and the CPU
shims are still needed."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mtp_dist import compat
from mtp_dist.compat import cpu


def test_upstream_still_matches_what_every_patch_relies_on():
    compat.check_all()


def test_a_changed_upstream_is_named():
    entry = compat.Upstream("megatron.core.utils", "this text is not in megatron-core")
    with pytest.raises(compat.UpstreamChanged, match="megatron.core.utils no longer contains"):
        entry.check()
    with pytest.raises(compat.UpstreamChanged, match="is gone"):
        compat.Upstream("megatron.core.utils:no_such_function", "x").check()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shims are for machines without a GPU")
def test_megatron_rng_tracker_needs_the_shim_on_cpu():
    """Without the shim megatron-core's RNG seeding fails on CPU; if this starts passing
    upstream, the shim can go."""
    code = (
        "from megatron.core.tensor_parallel import random as r\n"
        "r.model_parallel_cuda_manual_seed(1, tp_rank=0, ep_rank=0, etp_rank=0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "CUDA" in proc.stderr or "cuda" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shims are for machines without a GPU")
def test_megatron_imports_without_torch_compile_after_mtp_dist():
    """compat/startup.py: with mtp_dist imported first, megatron-core's fusions are plain
    functions and its import leaves torch's compiler unloaded; without it, they are compiled
    (torch.compile), which is what the shim saves (if that stops, the shim can go)."""
    code = (
        "import sys\n"
        "{first}"
        "from megatron.core.fusions import fused_bias_swiglu as f\n"
        "print(f.jit_fuser.__name__, 'torch._dynamo' in sys.modules)\n"
    )
    for first, want in (("import mtp_dist\n", "noop_decorator False"), ("", "compile True")):
        proc = subprocess.run(
            [sys.executable, "-c", code.format(first=first)], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.split() == want.split(), (first, proc.stdout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shims are for machines without a GPU")
def test_shimmed_tracker_forks_cpu_rng(megatron_1proc):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before), "fork must restore the default RNG"
    with get_cuda_rng_tracker().fork():
        b = torch.rand(3)
    assert not torch.equal(a, b), "the forked stream advances"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the shims refuse one")
def test_apply_refuses_on_gpu():
    with pytest.raises(RuntimeError):
        cpu.apply()


def test_pytest_ignores_exactly_the_known_warnings():
    """pyproject's filterwarnings and compat.KNOWN_WARNINGS name the same warnings: no blanket
    ignore that would hide upstream drift."""
    import tomllib

    from tests.support import ROOT

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = config["tool"]["pytest"]["ini_options"]["filterwarnings"]
    known = [f"ignore:{msg}:{cat.__name__}" for cat, msg in compat.KNOWN_WARNINGS]
    assert sorted(listed) == sorted(known)


def test_the_guards_still_read_upstream_after_patching(megatron_1proc):
    """distributed.init has applied megatron-core's patches (megatron_1proc), and on CPU the
    DeepSpeed one is applied here: every guard reads the original code through the patch,
    whatever the test order."""
    if not torch.cuda.is_available():
        from mtp_dist.compat import cpu

        cpu.apply_deepspeed()
    compat.check_all()


def test_a_checkpoint_save_leaves_no_process_a_step_signal_could_kill(megatron_1proc, tmp_path):
    # Unfixed, megatron-core's first save spawns a Manager server that outlives the save, and
    # SLURM's preemption signal to the job step kills it, failing the save the signal asks for.
    import psutil
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    state = {"w": ShardedTensor.from_rank_offsets("w", torch.arange(6.0), replica_id=0)}
    dist_checkpointing.save(state, str(tmp_path))
    assert psutil.Process().children() == []
    loaded = dist_checkpointing.load({"w": ShardedTensor.from_rank_offsets(
        "w", torch.zeros(6), replica_id=0)}, str(tmp_path))  # fmt: skip
    assert torch.equal(loaded["w"], torch.arange(6.0))
