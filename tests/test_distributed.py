"""Launcher environments -> rank, world size and rendezvous address."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from subprocess import PIPE

import pytest

from mtp_dist.distributed import read_launch_env
from mtp_dist.errors import UserError
from tests.support import ROOT


def test_torchrun_and_deepspeed_launcher_env():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node7",
           "MASTER_PORT": "1234"}  # fmt: skip
    e = read_launch_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port) == (
        3, 8, 1, "node7", "1234")  # fmt: skip


def test_slurm_env_without_torchrun():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu[003-004]", "SLURM_JOB_ID": "123456"}  # fmt: skip
    e = read_launch_env(env)
    assert (e.rank, e.world_size, e.local_rank) == (5, 16, 1)
    assert e.master_addr == "gpu003"
    assert e.master_port == str(20000 + 123456 % 10000)


def test_slurm_nodelist_forms():
    from mtp_dist.distributed import _first_slurm_host

    assert _first_slurm_host("node1,node2") == "node1"
    assert _first_slurm_host("gpu[010,012-014]") == "gpu010"
    assert _first_slurm_host("localhost") == "localhost"


def test_torchrun_env_wins_over_slurm():
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "n1", "SLURM_PROCID": "7",
           "SLURM_NTASKS": "9"}  # fmt: skip
    assert read_launch_env(env).world_size == 2


def test_lone_process_needs_no_port():
    """One process with no rendezvous given meets itself over an in-memory store: no port to
    take, so concurrent single-process runs cannot race for one (EADDRINUSE)."""
    e = read_launch_env({})
    assert (e.rank, e.world_size, e.master_port) == (0, 1, None)
    assert read_launch_env({"MASTER_PORT": "1234"}).master_port == "1234"  # given: used


def test_one_process_with_rank_env_but_no_port_needs_none():
    """RANK=0 WORLD_SIZE=1 (e.g. left by a launcher) and no MASTER_PORT: two such runs at once
    must not both take 29500."""
    a = read_launch_env({"RANK": "0", "WORLD_SIZE": "1"})
    assert a.world_size == 1 and a.master_port is None
    many = read_launch_env({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "n1"})
    assert many.master_port == "29500"  # ranks of one job must agree: the launcher's default


def test_two_lone_processes_start_at_once_without_a_port():
    """Two one-process groups start at once with no port anywhere in their environment, and
    leave MASTER_ADDR/MASTER_PORT unset (before: each took a "free" port, which the other
    could bind first)."""
    script = (
        "import os; from mtp_dist import distributed; import torch.distributed as dist\n"
        "dims = distributed.init(1, 1, seed=1)\n"
        "t = __import__('torch').ones(1); dist.all_reduce(t)\n"
        "print('OK', dims.world_size, t.item(), os.environ.get('MASTER_PORT'))\n"
        "distributed.destroy()\n"
    )
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    clean = {k: v for k, v in os.environ.items() if k not in launcher}
    run = [sys.executable, "-c", script]
    procs = [
        subprocess.Popen(run, cwd=ROOT, env=clean, text=True, stdout=PIPE, stderr=PIPE)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
        assert "OK 1 1.0 None" in out


@pytest.mark.parametrize(
    "env, fragment",
    [
        ({"WORLD_SIZE": "4"}, "WORLD_SIZE=4 is set without RANK"),
        ({"RANK": "3"}, "RANK=3 is set without WORLD_SIZE"),
        ({"RANK": "1", "WORLD_SIZE": "2"}, "MASTER_ADDR is not"),
        ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "n"}, "RANK='2' in the environment"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE='0'"),
        ({"RANK": "0", "WORLD_SIZE": "x"}, "WORLD_SIZE='x'"),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "0"}, "SLURM_NTASKS='0'"),
    ],
)
def test_stale_or_impossible_launcher_variables_are_refused(env, fragment):
    """A process would otherwise wait for peers that never come, or fail in torch."""
    with pytest.raises(UserError, match=re.escape(fragment)):
        read_launch_env(env)


def test_generate_with_a_stale_world_size_says_so(tmp_path):
    """Before: generate took WORLD_SIZE alone as its tensor-parallel size, and crashed."""
    # This process's own launcher variables (set by an in-process test's group) left out.
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    clean = {k: v for k, v in os.environ.items() if k not in launcher}
    proc = subprocess.run(
        [sys.executable, "-m", "mtp_dist.generate", str(tmp_path), "--prompt", "a"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**clean, "WORLD_SIZE": "4"},
    )  # fmt: skip
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr
    assert "WORLD_SIZE=4 is set without RANK" in errors[0]
