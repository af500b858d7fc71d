"""What the multi-process benchmarks share: run a script's worker mode under torchrun and read
the JSON its rank 0 prints on a line starting with `RESULT `."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def torchrun_result(script: str, procs: int, threads: int, args: list[str], timeout: int) -> dict:
    """`torchrun --nproc-per-node=procs script *args` with `threads` OpenMP threads per process;
    its RESULT object. A failed run ends the benchmark with the run's output."""
    from mtp_dist.distributed import free_port

    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={procs}",
        f"--master-port={free_port()}", script, *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))
