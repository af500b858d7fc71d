"""One training step with model.attention=sdpa against megatron: step time and peak memory.

Issue 19's CPU claim: torch's scaled_dot_product_attention (a fused flash kernel on CPU) in
place of megatron-core's local attention, which materialises and keeps the s x s softmax,
makes a step at seq 2048, micro batch 4 faster and smaller (goal: <= 0.7x the time, <= 0.6x
the peak).

Both models (same shape, same seed, so the same weights) live in one child process of this
script, each behind its own megatron engine (DDP, distributed optimizer: the trainer's step).
After a warm-up step each, their steps alternate for --rounds rounds, so the machine's load
falls on both alike. Time: wall time of engine.train_step. Peak: the process's peak resident
set size during that step above the RSS before it (as head_memory.py measures it: the
kernel's high-water mark reset before the step, glibc told to return freed blocks at once).
Medians over the rounds.

    python benchmarks/attention.py             # table + benchmarks/results/attention.json
    python benchmarks/attention.py --seq 256 --micro-batch 2 --rounds 1 --out /tmp/a.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULT = Path(__file__).resolve().parent / "results" / "attention.json"
ATTENTION = ("sdpa", "megatron")
MiB = 2**20
GOALS = {"time": 0.7, "peak": 0.6}
"""Issue 19's goals for sdpa / megatron."""


def engine_for(attention: str, args, dims):
    """A megatron engine over the benchmark's model (2 trunk layers + 2 heads, d=256, V=8000,
    fp32), one microbatch per step."""
    from mtp_dist import config, engines
    from mtp_dist.run_plan import resolve

    cfg = config.load(
        None,
        [
            f"model.attention={attention}",
            "model.n_future_tokens=2",
            "model.num_layers=2",
            "model.hidden_size=256",
            "model.num_attention_heads=4",
            "model.vocab_size=8000",
            f"model.seq_length={args.seq}",
            f"train.micro_batch_size={args.micro_batch}",
            f"train.global_batch_size={args.micro_batch}",
            "train.dtype=fp32",
            "train.seed=1",
            "data.synthetic=true",
            "logging.wandb=false",
        ],
    )
    plan = resolve(cfg, 1, on_gpu=False)
    return cfg, engines.build_engine(cfg, plan, dims, engines.build_model(cfg, plan, dims))


def worker(args) -> dict:
    import torch
    from head_memory import _CpuPeak

    from mtp_dist import distributed
    from mtp_dist.compat import ignore_known_warnings

    ignore_known_warnings()
    torch.set_num_threads(args.threads)
    dims = distributed.init(1, 1, seed=1)
    built = {a: engine_for(a, args, dims) for a in ATTENTION}
    cfg = built["sdpa"][0]
    gen = torch.Generator().manual_seed(0)
    shape = (args.micro_batch, args.seq + cfg.model.n_future_tokens)
    batch = [{"tokens": torch.randint(0, cfg.model.vocab_size, shape, generator=gen)}]
    samples = {a: {"seconds": [], "peaks_mib": [], "losses": []} for a in ATTENTION}
    for round_ in range(args.rounds + 1):  # round 0: warm-up (optimizer state, caches)
        for a in ATTENTION:
            engine = built[a][1]
            with _CpuPeak() as meter:
                start = time.perf_counter()
                result = engine.train_step(batch)
                seconds = time.perf_counter() - start
            if round_ > 0:
                samples[a]["seconds"].append(seconds)
                samples[a]["peaks_mib"].append(meter.peak / MiB)
            samples[a]["losses"].append(result.loss)
    rows = {
        a: {
            "step_s": statistics.median(s["seconds"]),
            "peak_mib": statistics.median(s["peaks_mib"]),
            **s,
        }
        for a, s in samples.items()
    }
    distributed.destroy()
    return rows


def table(result: dict) -> None:
    a = result["args"]
    print(
        f"One training step (megatron engine: forward, backward, AdamW), fp32, 1 process, "
        f"{a['threads']} thread(s); 2 trunk layers + 2 heads, d=256, 4 heads, V=8000, seq "
        f"{a['seq']}, micro batch {a['micro_batch']}; median of {a['rounds']} alternated rounds "
        "after a warm-up"
    )
    print("| attention | step s (median) | steps s | peak MiB (median) | loss, first step |")
    print("|---|---|---|---|---|")
    for name, r in result["rows"].items():
        steps = ", ".join(f"{x:.2f}" for x in r["seconds"])
        print(
            f"| {name} | {r['step_s']:.2f} | {steps} | {r['peak_mib']:.0f} | {r['losses'][0]:.6f} |"
        )
    ratios = result["ratios"]
    print(
        f"sdpa / megatron: time {ratios['time']:.2f}x (goal <= {GOALS['time']}), "
        f"peak {ratios['peak']:.2f}x (goal <= {GOALS['peak']})"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seq", type=int, default=2048, help="sequence length (default 2048)")
    p.add_argument("--micro-batch", type=int, default=4, help="micro batch (default 4)")
    p.add_argument("--rounds", type=int, default=3, help="measured steps per attention (3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", type=Path, default=RESULT, help="JSON result path")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    for name in ("seq", "micro_batch", "rounds", "threads"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            raise SystemExit(2)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    root = Path(__file__).resolve().parent.parent
    env = dict(
        os.environ,
        MALLOC_MMAP_THRESHOLD_="65536",
        MALLOC_TRIM_THRESHOLD_="65536",
        OMP_NUM_THREADS=str(args.threads),
        PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    )
    cmd = [sys.executable, __file__, "--worker", *sys.argv[1:]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: the measuring process failed:\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    rows = json.loads(line.removeprefix("RESULT "))
    sdpa, ref = rows["sdpa"], rows["megatron"]
    result = {
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "worker")},
        "rows": rows,
        "ratios": {
            "time": sdpa["step_s"] / ref["step_s"],
            "peak": sdpa["peak_mib"] / ref["peak_mib"],
        },
        "goals": GOALS,
    }
    table(result)
    from mtp_dist.files import atomic_write_json

    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
