"""Helpers shared by the tests: the repository root and a torchrun launcher for multi-process
workers (CPU, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil

from mtp_dist.distributed import free_port

ROOT = Path(__file__).resolve().parent.parent


def torchrun(nproc: int, script: str | Path, *args: str, timeout: int = 600, env=None):
    """Run `script` under torchrun on CPU/gloo; raise with its output if it fails."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}",
        str(script),
        *args,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(
        cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def kill_tree(pid: int) -> None:
    """kill -9 a process and every process under it, as a scheduler ends a job. Not killpg:
    torchrun starts its ranks in sessions of their own, so the launcher's group misses them."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    family = [root, *root.children(recursive=True)]
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from a run's metrics.jsonl; the last record of a step wins (a resumed run
    repeats the steps after its checkpoint)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = r["loss"]
    return out
