"""Peak memory of one training step (forward + backward) for n=1, n=4 joint and n=4 sequential.

The paper's claim (Gloeckle et al. 2024, Section 2): running the heads' forward and backward one
after another brings the peak from O(nV + d) to O(V + d), so n=4 sequential should sit within a
few percent of n=1 while n=4 joint is clearly above. The trunk is the same in every case; shapes
are chosen so that the logits dominate.

Each case runs in its own child process (this script with --case) so that no allocator state
carries over. On CPU the peak is the process's peak resident set size over the measured step:
the kernel's high-water mark is reset (`5` into /proc/self/clear_refs) just before the step and
VmHWM is read after it; glibc is told to serve allocations above 64 KiB with mmap so a freed
tensor leaves the RSS at once. On CUDA, torch.cuda.max_memory_allocated is used instead.

    python benchmarks/head_memory.py            # all cases, table + benchmarks/results/...
    python benchmarks/head_memory.py --case n4_seq
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

CASES = {"n1": (1, "joint"), "n4_joint": (4, "joint"), "n4_seq": (4, "sequential")}
MiB = 2**20
RESULT = Path(__file__).resolve().parent / "results" / "head_memory.json"


def _vm_kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1))


class _CpuPeak:
    """Peak RSS above the RSS at entry (Linux only: needs /proc/self/clear_refs)."""

    def __enter__(self):
        gc.collect()
        # Hand freed small-chunk heap back too, so the baseline is the live set.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        self.before = _vm_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        self.peak = _vm_kib("VmHWM") * 1024 - self.before


class _CudaPeak:
    def __enter__(self):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.before = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        import torch

        torch.cuda.synchronize()
        self.peak = torch.cuda.max_memory_allocated() - self.before


def run_case(case: str, args) -> dict:
    """Build the model, take a warm-up step, then measure one step; returns one table row."""
    import torch

    from mtp_dist import distributed
    from mtp_dist.compat import ignore_known_warnings
    from mtp_dist.config import ModelConfig
    from mtp_dist.model.model import build_model
    from mtp_dist.model.weights import init_weights

    ignore_known_warnings()

    n, mode = CASES[case]
    dims = distributed.init(1, 1, seed=1)
    cfg = ModelConfig(
        n_future_tokens=n,
        num_layers=args.trunk_layers,
        hidden_size=args.hidden,
        num_attention_heads=4,
        vocab_size=args.vocab,
        seq_length=args.seq,
        head_backward=mode,
    )
    model = build_model(cfg, device=dims.device)
    init_weights(model, seed=1)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.micro_batch, args.seq + n), generator=gen)
    tokens = tokens.to(dims.device)

    def step() -> float:
        out = model(tokens)
        out.loss.backward()
        return out.loss.item()

    step()
    for p in model.parameters():
        p.grad = None
    meter = _CudaPeak() if dims.device.type == "cuda" else _CpuPeak()
    start = time.perf_counter()
    with meter:
        loss = step()
    seconds = time.perf_counter() - start
    logits_bytes = args.seq * args.micro_batch * cfg.padded_vocab_size * 4
    return {
        "case": case,
        "n": n,
        "head_backward": mode,
        "peak_step_mib": meter.peak / MiB,
        "logits_one_head_mib": logits_bytes / MiB,
        "loss": loss,
        "step_seconds": seconds,
        "device": dims.device.type,
    }


def run_child(case: str, args) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--case", case, *_shape_flags(args)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _shape_flags(args) -> list[str]:
    return [
        f"--{k.replace('_', '-')}={getattr(args, k)}"
        for k in ("hidden", "trunk_layers", "seq", "micro_batch", "vocab")
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--case", choices=sorted(CASES), help="run one case in this process")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--trunk-layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--out", type=Path, default=RESULT)
    args = p.parse_args()

    if args.case:
        print(json.dumps(run_case(args.case, args)))
        return

    rows = [run_child(case, args) for case in CASES]
    base = rows[0]["peak_step_mib"]
    for r in rows:
        r["ratio_to_n1"] = r["peak_step_mib"] / base
    method = (
        "torch.cuda.max_memory_allocated - allocated before step"
        if rows[0]["device"] == "cuda"
        else "peak RSS (VmHWM after clear_refs reset) - RSS before step, mmap threshold 64 KiB"
    )
    print(
        f"One training step (fwd+bwd), hidden {args.hidden}, trunk {args.trunk_layers} layers, "
        f"seq {args.seq}, micro batch {args.micro_batch}, V {args.vocab}, fp32"
    )
    print(f"Memory: {method}")
    header = ("case", "n", "head mode", "peak step MiB", "ratio to n=1", "logits/head MiB")
    print("{:<10} {:>2} {:<11} {:>14} {:>13} {:>16}".format(*header))
    for r in rows:
        print(
            f"{r['case']:<10} {r['n']:>2} {r['head_backward']:<11} {r['peak_step_mib']:>14.1f} "
            f"{r['ratio_to_n1']:>13.3f} {r['logits_one_head_mib']:>16.1f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shape = {k: getattr(args, k) for k in ("hidden", "trunk_layers", "seq", "micro_batch", "vocab")}
    args.out.write_text(json.dumps({"method": method, "shape": shape, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
