"""Distributed start-up in one place.

Reads the launcher's environment (torchrun, the deepspeed launcher, or SLURM's srun), creates
the process groups through megatron-core's parallel_state, picks the device (CUDA with NCCL if
present, else CPU with gloo and the megatron-core CPU shims) and seeds every RNG.
`ParallelDims` is the one source of truth for sizes and ranks; it is passed, not re-derived.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    rank: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: str | None  # None: one process, no rendezvous given (an in-memory store)


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
        )
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        # No scontrol here: expand the first entry of e.g. "gpu[003-004,010],cpu01" by hand.
        m = re.match(r"([^,\[]+)(?:\[([^,\]-]+))?", nodelist)
        return m.group(1) + (m.group(2) or "") if m else nodelist


def _int_var(env, name: str, low: int, high: int | None = None) -> int:
    from mtp_dist.errors import UserError

    value = env[name]
    ok = value.strip().isdigit() and int(value) >= low and (high is None or int(value) < high)
    if not ok:
        bound = f">= {low}" + (f" and < {high}" if high is not None else "")
        raise UserError(
            f"{name}={value!r} in the environment must be an integer {bound}: a launcher "
            "(torchrun, deepspeed, srun) sets it; unset it to run one process"
        )
    return int(value)


def read_launch_env(env: dict[str, str] | None = None) -> LaunchEnv:
    """Rank, world size and rendezvous address from torchrun/deepspeed (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR/PORT) or SLURM (SLURM_PROCID, SLURM_NTASKS, ...); a plain process
    is rank 0 of 1. Variables left over from another job (a WORLD_SIZE of several without a
    launcher's RANK and MASTER_ADDR) are refused: this process would wait for peers that never
    come."""
    from mtp_dist.errors import UserError

    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        world_size = _int_var(env, "WORLD_SIZE", 1)
        rank = _int_var(env, "RANK", 0, world_size)
        if world_size > 1 and "MASTER_ADDR" not in env:
            raise UserError(
                f"RANK={rank} and WORLD_SIZE={world_size} are set but MASTER_ADDR is not: a "
                "launcher sets all three, so these are stale; start the ranks with torchrun (or "
                "launch/), or unset RANK and WORLD_SIZE to run one process"
            )
        # One process without a given port rendezvouses with itself in memory: concurrent runs
        # must not collide on 29500, nor race for a port that was free a moment ago.
        default_port = "29500" if world_size > 1 else None
        return LaunchEnv(
            rank=rank,
            world_size=world_size,
            local_rank=_int_var(env, "LOCAL_RANK", 0) if "LOCAL_RANK" in env else 0,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=env.get("MASTER_PORT") or default_port,
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job = int(env.get("SLURM_JOB_ID", "0"))
        ntasks = _int_var(env, "SLURM_NTASKS", 1)
        return LaunchEnv(
            rank=_int_var(env, "SLURM_PROCID", 0, ntasks),
            world_size=ntasks,
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR")
            or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            master_port=env.get("MASTER_PORT", str(20000 + job % 10000)),
        )
    stale = [k for k in ("WORLD_SIZE", "RANK") if k in env and env[k].strip() not in ("0", "1")]
    if stale:
        raise UserError(
            f"{stale[0]}={env[stale[0]]} is set without "
            f"{'RANK' if stale[0] == 'WORLD_SIZE' else 'WORLD_SIZE'}: it is left over from "
            "another job (a launcher sets both); start the ranks with torchrun (or launch/), or "
            f"unset {stale[0]} to run one process"
        )
    # A lone process needs no port (an in-memory store), so concurrent runs cannot collide.
    return LaunchEnv(0, 1, 0, "127.0.0.1", env.get("MASTER_PORT") or None)


def collective_device(group=None) -> torch.device:
    """Where a collective's tensors must live for the group's backend: the current CUDA device
    for NCCL (which rejects CPU tensors), the CPU for gloo. Every collective mtp_dist issues
    itself takes its tensors from here, so the GPU path is right by construction."""
    if dist.get_backend(group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def free_port() -> int:
    """A TCP port free on this host right now (for a rendezvous we start ourselves)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(tensor: int, pipeline: int, seed: int, timeout_minutes: int = 30) -> ParallelDims:
    """Initialise torch.distributed and megatron-core's groups; seed; return the layout.

    Sizes are validated before any compute by run_plan.resolve (megatron-core checks them
    again when it creates the groups).
    """
    from megatron.core import parallel_state

    launch = read_launch_env()
    device = prepare_device(launch.local_rank)
    use_cuda = device.type == "cuda"
    # Libraries that read the environment (DeepSpeed) see the same layout under srun or alone.
    os.environ.setdefault("RANK", str(launch.rank))
    os.environ.setdefault("WORLD_SIZE", str(launch.world_size))
    os.environ.setdefault("LOCAL_RANK", str(launch.local_rank))
    if not dist.is_initialized():
        if launch.master_port is None:
            store = dist.HashStore()
        else:
            store = None  # torch's env:// rendezvous at MASTER_ADDR:MASTER_PORT
            os.environ.setdefault("MASTER_ADDR", launch.master_addr)
            os.environ.setdefault("MASTER_PORT", launch.master_port)
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            store=store,
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timedelta(minutes=timeout_minutes),
        )
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor,
        pipeline_model_parallel_size=pipeline,
        distributed_timeout_minutes=timeout_minutes,
    )
    dims = ParallelDims(
        world_size=launch.world_size,
        rank=launch.rank,
        local_rank=launch.local_rank,
        tp=tensor,
        pp=pipeline,
        dp=parallel_state.get_data_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        device=device,
    )
    seed_all(seed)
    return dims


def prepare_device(local_rank: int) -> torch.device:
    """This process's device: its CUDA device if there is one, else the CPU with megatron-core's
    CPU shims; the fixes of upstream bugs apply on both."""
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        from mtp_dist.compat import cpu

        cpu.apply()
        device = torch.device("cpu")
    from mtp_dist.compat import megatron as megatron_fixes

    megatron_fixes.apply()
    return device


@contextmanager
def single_process(seed: int, timeout_minutes: int = 30) -> Iterator[torch.device]:
    """torch.distributed and megatron-core's groups (TP1 x PP1) for this process alone, over an
    in-memory store (no port, no launcher variables): whole-model work outside a run's world,
    such as the export, or reading model.init_from before the run's own group exists.
    Everything is torn down on exit."""
    from megatron.core import parallel_state

    if dist.is_initialized():
        raise RuntimeError("single_process: this process already has a process group")
    device = prepare_device(0)
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        store=dist.HashStore(),
        rank=0,
        world_size=1,
        timeout=timedelta(minutes=timeout_minutes),
    )
    try:
        parallel_state.initialize_model_parallel(distributed_timeout_minutes=timeout_minutes)
        seed_all(seed)
        yield device
    finally:
        destroy()


def seed_all(seed: int) -> None:
    """Seed Python, NumPy, torch and megatron-core's model-parallel RNG tracker.

    The same seed on every rank: weights are initialised from full tensors keyed by name
    (model.init_weights), so they do not depend on the rank's RNG stream.
    """
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def destroy() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
