"""Pipeline balance on CPU: step time and per-stage busy time with the even split of the trunk
against the balanced one (parallel.pipeline_layers=auto), at PP2 and PP4 under torchrun (gloo).

The shape puts a large share of the work on the last stage: n=4 heads, each one transformer
layer plus an unembedding, with the vocabulary 32 times the width (the 0.3B-like V/d of the
step-time benchmark). For each pipeline size one torchrun builds both models (even and
balanced, each with the megatron engine: DDP, distributed optimizer) and alternates their
training steps, so both see the same machine load; the figures are medians over the measured
steps after warm-up.

A stage's busy time is the step time minus the time its rank spent inside megatron-core's
pipeline send/receive calls (waiting for a neighbour included): what the stage computes (and
its optimizer step). Its CPU time is the process's CPU seconds over the step outside those
calls: unlike wall time it does not count time spent descheduled, so on a crowded machine it is
the steadier measure of a stage's work (the slowest stage's bounds the step in 1F1B). The
predicted speed-up is the ratio of the slowest stage's training FLOPs (model/costs.py), the
quantity the balanced split minimises.

    python benchmarks/pipeline_balance.py                 # PP2 and PP4, table + JSON
    python benchmarks/pipeline_balance.py --pipelines 2 --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "pipeline_balance.json"

sys.path.insert(0, str(ROOT / "benchmarks"))
from _torchrun import torchrun_result  # noqa: E402

SHAPE = [
    "model.n_future_tokens=4",
    "model.num_layers=12",
    "model.hidden_size=128",
    "model.num_attention_heads=4",
    "model.vocab_size=4096",
    "model.vocab_multiple=128",
    "model.seq_length=64",
    "train.micro_batch_size=1",
    "train.global_batch_size=8",
    "train.warmup_steps=1",
    "data.synthetic=true",
    "logging.wandb=false",
]
CASES = ("even", "auto")


def worker(args) -> None:
    """One torchrun process: both splits built, their steps alternated; rank 0 prints JSON."""
    import torch
    import torch.distributed as dist
    from megatron.core.pipeline_parallel import p2p_communication

    from mtp_dist import config, distributed, engines
    from mtp_dist.compat import ignore_known_warnings
    from mtp_dist.model.costs import pipeline_split, stage_costs
    from mtp_dist.run_plan import resolve

    ignore_known_warnings()
    waiting = [0.0, 0.0]  # wall and CPU seconds inside pipeline send/receive calls

    def timed(fn):
        def wrapper(*a, **k):
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                waiting[0] += time.perf_counter() - start
                waiting[1] += time.process_time() - cpu

        return wrapper

    comm = p2p_communication.P2PCommunicator
    for name in list(vars(comm)):
        if name.startswith(("send_", "recv_")):
            setattr(comm, name, timed(getattr(comm, name)))

    pp = args.pipeline
    dims = distributed.init(1, pp, seed=1234)
    world = dims.world_size
    built = {}
    for case in CASES:
        cfg = config.load(
            None, [*SHAPE, f"parallel.pipeline={pp}", f"parallel.pipeline_layers={case}"]
        )
        plan = resolve(cfg, world, on_gpu=False)
        model = engines.build_model(cfg, plan, dims)
        engine = engines.build_engine(cfg, plan, dims, model)
        split = pipeline_split(cfg.model, cfg.parallel)
        flops = [s.flops_per_token for s in stage_costs(cfg.model, 1, split)]
        built[case] = (cfg, plan, engine, split, flops)
    gen = torch.Generator().manual_seed(0)
    cfg = built["even"][0]
    tokens = cfg.model.seq_length + cfg.model.n_future_tokens
    batch = [
        {"tokens": torch.randint(0, cfg.model.vocab_size, (1, tokens), generator=gen)}
        for _ in range(built["even"][1].num_microbatches)
    ]
    rows = {case: {"step": [], "busy": [], "cpu": []} for case in CASES}
    for i in range(args.warmup + args.steps):
        for case in CASES:
            engine = built[case][2]
            dist.barrier()
            waiting[:] = [0.0, 0.0]
            start, cpu = time.perf_counter(), time.process_time()
            engine.train_step(batch)
            cpu = time.process_time() - cpu - waiting[1]
            dist.barrier()
            step = time.perf_counter() - start
            if i >= args.warmup:
                rows[case]["step"].append(step)
                rows[case]["busy"].append(step - waiting[0])
                rows[case]["cpu"].append(cpu)
    gathered = [None] * world
    dist.all_gather_object(gathered, {"rank": dims.rank, "pp_rank": dims.pp_rank, "rows": rows})
    if dims.rank == 0:
        out = {}
        for case in CASES:
            _, plan, _, split, flops = built[case]
            by_stage = sorted(gathered, key=lambda g: g["pp_rank"])
            out[case] = {
                "split": list(split),
                "flops_per_token": flops,
                "microbatches": plan.num_microbatches,
                "step_seconds": statistics.median(by_stage[0]["rows"][case]["step"]),
                "busy_seconds": [statistics.median(g["rows"][case]["busy"]) for g in by_stage],
                "cpu_seconds": [statistics.median(g["rows"][case]["cpu"]) for g in by_stage],
            }
        print("RESULT " + json.dumps(out), flush=True)
    distributed.destroy()


def launch(pp: int, args) -> dict:
    worker_args = ["--worker", "--pipeline", str(pp), "--steps", str(args.steps),
                   "--warmup", str(args.warmup)]  # fmt: skip
    return torchrun_result(__file__, pp, 1, worker_args, timeout=3600)


def table(results: dict) -> str:
    lines = [
        "| PP | split | trunk layers per stage | busy s per stage | CPU s per stage "
        "| step s | step speed-up | slowest stage's CPU s, speed-up "
        "| predicted (slowest stage's FLOPs) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for pp, r in results.items():
        even = r["even"]
        for case in CASES:
            c = r[case]
            speedup = even["step_seconds"] / c["step_seconds"]
            predicted = max(even["flops_per_token"]) / max(c["flops_per_token"])
            busy = " / ".join(f"{b:.3f}" for b in c["busy_seconds"])
            cpu = " / ".join(f"{b:.3f}" for b in c["cpu_seconds"])
            by_cpu = max(even["cpu_seconds"]) / max(c["cpu_seconds"])
            name = "even" if case == "even" else "balanced (auto)"
            lines.append(
                f"| {pp} | {name} | {c['split']} | {busy} | {cpu} | {c['step_seconds']:.3f} | "
                f"{speedup:.2f}x | {max(c['cpu_seconds']):.3f}, {by_cpu:.2f}x | {predicted:.2f}x |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipelines", type=int, nargs="+", default=[2, 4])
    p.add_argument("--steps", type=int, default=6, help="measured steps per case")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--pipeline", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    results = {pp: launch(pp, args) for pp in args.pipelines}
    print(table(results))
    cores = os.cpu_count()
    crowded = [f"PP{pp}" for pp in args.pipelines if pp > cores]
    print(
        f"CPU, gloo, {cores} cores shared with other jobs"
        + (
            f"; {', '.join(crowded)} runs more processes than cores (oversubscribed): its busy "
            "times include time spent descheduled."
            if crowded
            else "."
        )
    )
    from mtp_dist.files import atomic_write_json

    payload = {
        "shape": SHAPE,
        "steps": args.steps,
        "warmup": args.warmup,
        "cpu_count": os.cpu_count(),
        "results": {str(k): v for k, v in results.items()},
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULT, payload)
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
