"""Benchmark: heads on an existing model (train.trainable=heads, issue 22).

1. Step cost (one process, the megatron engine, fp32, synthetic tokens): heads-only against full
   training of the same n=4 model at a trunk-heavy shape (12 trunk layers, d=256, V=2000, seq
   256), the two steps alternating inside one run so that both see the same machine load:
   median step time; the step's peak memory above the live set (peak RSS, as head_memory.py);
   the training state the engine keeps (gradient buffers, fp32 main weights, Adam moments);
   next to the ratio of training FLOPs of the planner's cost model (flops_per_token(m,
   trainable)). Goal: the time ratio within 10% of the FLOP ratio.

2. The use case, on the demo's data and tokenizer (--data: a workdir of `python -m
   mtp_dist.demo`, whose corpus also gives held-out prompts) at configs/small.yaml's shape
   (4 trunk layers, d=256, V=8000), two training processes:
   a) n=1 trained for --n1-steps steps and exported as a Hugging Face directory (as a Llama
      user would start);
   b) n=4 from that directory (model.init_from: heads 2..4 are copies of head 1), heads only
      for --heads-steps steps;
   c) n=4 from the start for the steps that cost what a) and b) cost together in the cost
      model's FLOPs.
   For the copied heads (before b), after b), and c): held-out top-1 accuracy per head, the
   acceptance of heads 2..4's drafts, tokens per forward and the measured speedup of
   self-speculative decoding (k=2 and k=4, batch 1, greedy-identical, one thread) over greedy;
   and whether greedy decoding gives the n=1 model's tokens.

Finished training runs under --workdir are reused (the trainer says "done").

    python benchmarks/heads_only.py --data /work/bench/speculative --workdir runs/heads_only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "heads_only.json"
# The repository first: benchmarks/data_prep.py must not shadow the data_prep package.
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from head_memory import MiB, _CpuPeak  # noqa: E402

TRUNK_HEAVY = [
    "model.n_future_tokens=4",
    "model.num_layers=12",
    "model.hidden_size=256",
    "model.num_attention_heads=4",
    "model.vocab_size=2000",
    "model.vocab_multiple=128",
    "model.seq_length=256",
    "train.micro_batch_size=8",
    "train.global_batch_size=8",
    "train.warmup_steps=1",
    "data.synthetic=true",
    "logging.wandb=false",
]
MODES = ("all", "heads")


def training_state_bytes(engine) -> int:
    """What the megatron engine keeps for training besides the weights: the DDP gradient
    buffers, and the distributed optimizer's fp32 main weights and Adam moments."""
    grads = sum(b.grad_data.numel() * b.grad_data.element_size() for b in engine.ddp.buffers)
    opt = 0
    for o in getattr(engine.optimizer, "chained_optimizers", [engine.optimizer]):
        for state in o.optimizer.state.values():
            opt += sum(v.numel() * v.element_size() for v in state.values() if v.dim() > 0)
        for group in getattr(o, "shard_fp32_from_float16_groups", []):
            opt += sum(p.numel() * p.element_size() for p in group)
    return grads + opt


def worker_timing(args) -> None:
    """Part 1 in this process; prints one JSON line."""
    import torch.distributed as dist

    from mtp_dist import config, distributed, engines
    from mtp_dist.compat import ignore_known_warnings
    from mtp_dist.model.model import flops_per_token
    from mtp_dist.run_plan import resolve

    ignore_known_warnings()
    dims = distributed.init(1, 1, seed=1234)
    built = {}
    for mode in MODES:
        cfg = config.load(None, [*TRUNK_HEAVY, f"train.trainable={mode}"])
        plan = resolve(cfg, 1, on_gpu=False)
        engine = engines.build_engine(cfg, plan, dims, engines.build_model(cfg, plan, dims))
        from step_time import batches

        built[mode] = (cfg, engine, batches(cfg, plan))
    times = {m: [] for m in MODES}
    cpu = {m: [] for m in MODES}
    peaks = {m: [] for m in MODES}
    for i in range(args.warmup + args.steps):
        for mode, (_, engine, data) in built.items():
            dist.barrier()
            meter = _CpuPeak()
            start, start_cpu = time.perf_counter(), time.process_time()
            with meter:
                engine.train_step(data)
            if i >= args.warmup:
                times[mode].append(time.perf_counter() - start)
                cpu[mode].append(time.process_time() - start_cpu)
                peaks[mode].append(meter.peak)
    out = {}
    for mode, (cfg, engine, _) in built.items():
        model = engine.model
        out[mode] = {
            "step_seconds": times[mode],
            "median_seconds": statistics.median(times[mode]),
            "cpu_seconds": cpu[mode],
            "median_cpu_seconds": statistics.median(cpu[mode]),
            "step_peak_mib": max(peaks[mode]) / MiB,
            "weights_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / MiB,
            "training_state_mib": training_state_bytes(engine) / MiB,
            "trained_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "parameters": sum(p.numel() for p in model.parameters()),
            "flops_per_token": flops_per_token(cfg.model, mode),
        }
    print("RESULT " + json.dumps(out), flush=True)
    distributed.destroy()


def run_timing(args) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536",
               OMP_NUM_THREADS=str(args.threads))  # fmt: skip
    cmd = [sys.executable, __file__, "--worker", "timing", f"--steps={args.steps}",
           f"--warmup={args.warmup}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


# ---------------------------------------------------------------- the use case


def small(args, run: str, *more: str) -> list[str]:
    """configs/small.yaml on the demo's shards and tokenizer, in --workdir/run."""
    data = args.data.resolve()
    return [
        "--config", "configs/small.yaml", f"run.dir={args.workdir.resolve() / run}",
        f"data.paths=[{data / 'shards'}]", f"data.tokenizer={data / 'tokenizer/tokenizer.model'}",
        "train.lr=2e-3", "train.eval_interval=0", "checkpoint.interval=50", "checkpoint.keep=2",
        "logging.wandb=false", *more,
    ]  # fmt: skip


def train(args, overrides: list[str]) -> str:
    from mtp_dist.distributed import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}",
           f"--master-port={free_port()}", "-m", "mtp_dist.train", *overrides]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return " ".join(["torchrun", f"--nproc-per-node={args.nproc}", "-m", "mtp_dist.train",
                     *overrides])  # fmt: skip


def compute_matched_steps(args) -> int:
    """Steps of n=4 from the start that cost the cost model's FLOPs of n=1 for --n1-steps and
    heads-only for --heads-steps (the same tokens per step)."""
    from mtp_dist import config
    from mtp_dist.model.model import flops_per_token

    m4 = config.load("configs/small.yaml").model
    m1 = dataclasses.replace(m4, n_future_tokens=1, head_loss_weights=None)
    spent = args.n1_steps * flops_per_token(m1) + args.heads_steps * flops_per_token(m4, "heads")
    return round(spent / flops_per_token(m4))


def trainings(args) -> dict:
    """a), b), c) of the module's docstring; returns the commands and the runs."""
    from mtp_dist.export import export

    w = args.workdir.resolve()
    n1 = train(args, small(args, "n1", "model.n_future_tokens=1", f"train.steps={args.n1_steps}"))
    hf = w / "n1_hf"
    if not hf.exists():
        export(w / "n1", hf, "hf")
    heads = small(args, "heads", f"model.init_from={hf}", "train.trainable=heads",
                  f"train.steps={args.heads_steps}")  # fmt: skip
    # The copied heads, before any training: a conversion run of 0 steps.
    copied = train(args, small(args, "copied", f"model.init_from={hf}", "train.steps=0"))
    heads = train(args, heads)
    matched = compute_matched_steps(args)
    n4 = train(args, small(args, "n4", f"train.steps={matched}"))
    return {"n1": n1, "export": f"python -m mtp_dist.export {w / 'n1'} {hf} --format hf",
            "copied": copied, "heads": heads, "n4": n4, "n4_steps": matched}  # fmt: skip


def run_seconds(run: Path) -> float:
    """Training wall seconds of a run (from its metrics; 0 for a conversion)."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0.0
    by_step = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        by_step[r["step"]] = r["step_time_s"]
    return sum(by_step.values())


def decoding(args) -> dict:
    """Per model: held-out head accuracy, k=4 decoding against greedy, greedy tokens."""
    import torch
    from speculative import head_accuracy, held_out_prompts, measure

    from mtp_dist import distributed, sources
    from mtp_dist.compat import ignore_known_warnings
    from mtp_dist.inference.decode import Decoder
    from mtp_dist.model.model import build_model

    ignore_known_warnings()
    torch.set_num_threads(args.threads)
    w = args.workdir.resolve()
    names = {"n1": w / "n1", "copied heads": w / "copied", "heads-only": w / "heads",
             "n=4 from the start": w / "n4"}  # fmt: skip
    dims = distributed.init(1, 1, seed=0)
    out, greedy = {}, {}
    try:
        tokenizer = sources.load_tokenizer(sources.open_source(names["n1"]))
        need = args.prompt_tokens + args.new_tokens
        prompts, windows, files = held_out_prompts(
            args.data, tokenizer, args.prompts, args.prompt_tokens, need, seed=0
        )
        for name, path in names.items():
            source = sources.open_source(path)
            model = build_model(source.model, device=dims.device)
            source.load_into(model)
            model.eval()
            vocab = source.model.vocab_size
            decoder = Decoder(model, vocab)
            decoder.generate(prompts[:1], 8, k=min(4, source.model.n_future_tokens))  # warm-up
            ks = [1, 2, 4] if source.model.n_future_tokens == 4 else [1]
            rows = measure([decoder, decoder], prompts, args.new_tokens, ks, 1, args.repeats)
            greedy[name] = [r.tokens for r in decoder.generate(prompts, args.new_tokens, k=1)]
            out[name] = {
                "source": str(source.path),
                "step": source.step,
                "train_seconds": run_seconds(path),
                "held_out_head_accuracy": head_accuracy(model, windows, vocab),
                "rows": rows,
            }
    finally:
        distributed.destroy()
    for name in out:
        out[name]["greedy_equals_n1"] = greedy[name] == greedy["n1"]
    return {"models": out, "prompts": files}


def print_tables(timing: dict, use: dict, uptime: tuple[str, str]) -> None:
    a, h = timing["all"], timing["heads"]
    flop = h["flops_per_token"] / a["flops_per_token"]
    time_ratio = h["median_seconds"] / a["median_seconds"]
    cpu_ratio = h["median_cpu_seconds"] / a["median_cpu_seconds"]
    print(f"\nStep cost, n=4, 12 trunk layers, d=256, V=2000, seq 256, micro batch 8, fp32, "
          f"one process, one thread (load average before / after: {uptime[0]} / "
          f"{uptime[1]})")  # fmt: skip
    print("| train.trainable | step s (median) | ratio | CPU s (median) | ratio | FLOP ratio "
          "(cost model) | trained params | training state MiB | step peak MiB | weights + "
          "state + step MiB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode, r in (("all", a), ("heads", h)):
        total = r["weights_mib"] + r["training_state_mib"] + r["step_peak_mib"]
        ratio = (1.0, 1.0, 1.0) if mode == "all" else (time_ratio, cpu_ratio, flop)
        print(f"| {mode} | {r['median_seconds']:.3f} | {ratio[0]:.3f} "
              f"| {r['median_cpu_seconds']:.3f} | {ratio[1]:.3f} | {ratio[2]:.3f} "
              f"| {r['trained_parameters']:,} | {r['training_state_mib']:.1f} "
              f"| {r['step_peak_mib']:.1f} | {total:.1f} |")  # fmt: skip
    print(f"measured / FLOP ratio: {time_ratio / flop:.3f} (wall), {cpu_ratio / flop:.3f} (CPU "
          "time); goal 0.90..1.10")  # fmt: skip
    print("\nThe use case: configs/small.yaml (4 trunk layers, d=256, V=8000), n=4, "
          "batch 1, greedy-identical speculative decoding")  # fmt: skip
    print("| model | steps | train min | held-out top-1 heads 1..4 | acceptance heads 2..4 "
          "(k=4) | tokens/forward k=2 / 4 | speedup k=2 / 4 | greedy = n=1's |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, r in use["models"].items():
        acc = " / ".join(f"{x:.3f}" for x in r["held_out_head_accuracy"])
        spec = [x for x in r["rows"] if x["k"] > 1]
        accept = " / ".join(f"{x:.2f}" for x in spec[-1]["acceptance"]) if spec else "-"
        tpf = " / ".join(f"{x['tokens_per_forward']:.2f}" for x in spec) or "-"
        speed = " / ".join(f"{x['speedup']:.2f}" for x in spec) or "-"
        same = "yes" if r["greedy_equals_n1"] else "no"
        if name == "n=4 from the start":
            same += " (its own trunk)"
        print(f"| {name} | {r['step']} | {r['train_seconds'] / 60:.1f} | {acc} | {accept} "
              f"| {tpf} | {speed} | {same} |")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--worker", choices=["timing"], help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, default=Path("runs/speculative"),
                   help="a demo workdir: shards/, tokenizer/, corpus/")  # fmt: skip
    p.add_argument("--workdir", type=Path, default=Path("runs/heads_only"))
    p.add_argument("--n1-steps", type=int, default=240)
    p.add_argument("--heads-steps", type=int, default=60)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=6, help="measured steps of each mode (part 1)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-use-case", action="store_true", help="part 1 only")
    p.add_argument("--out", type=Path, default=RESULT)
    args = p.parse_args()
    if args.worker == "timing":
        return worker_timing(args)

    load_before = os.getloadavg()
    t0 = time.time()
    use, commands = None, None
    if not args.skip_use_case:
        commands = trainings(args)
    timing = run_timing(args)
    if not args.skip_use_case:
        use = decoding(args)
    load_after = os.getloadavg()
    uptime = tuple(" ".join(f"{x:.1f}" for x in la) for la in (load_before, load_after))
    print_tables(timing, use or {"models": {}}, uptime)

    import torch

    from mtp_dist.files import atomic_write

    a, h = timing["all"], timing["heads"]
    result = {
        "timing": timing,
        "time_ratio": h["median_seconds"] / a["median_seconds"],
        "cpu_time_ratio": h["median_cpu_seconds"] / a["median_cpu_seconds"],
        "flop_ratio": h["flops_per_token"] / a["flops_per_token"],
        "use_case": use,
        "commands": commands,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "note": "the CPU was shared with other jobs where the load exceeds the cores",
        },  # fmt: skip
        "seconds": time.time() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
