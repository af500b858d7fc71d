"""Training step time on CPU against the FLOP bound: the heads, our wrapper, and the layouts.

Three measurements, each alternating its cases step by step inside one run, so that all cases
see the same machine load; the figures are medians over the measured steps after warm-up.

1. Heads (one process). The 0.3B-like shape (d=256, V=8000, the same V/d as 0.3B; seq 512),
   parameter-matched at 18 layers in all: n=1 (17 trunk layers + 1 head), n=4 sequential and
   n=4 joint (14 + 4). Each through the megatron engine (DDP, distributed optimizer). The
   measured step-time ratio to n=1 is shown next to the ratio of training FLOPs per token of
   the planner's FLOP model (model/model.py flops_per_token). Goal: measured / FLOP <= 1.02.

2. Wrapper (one process). Our n=1 against a plain megatron-core GPTModel of the same shape
   (the same layer spec from model/spec.py, the same TransformerConfig, vocabulary, sequence,
   untied like ours) through the same megatron-core schedule, DDP and distributed optimizer
   (a MegatronEngine whose forward_backward feeds GPTModel's own forward and loss). The ratio
   is the cost of our model class over megatron-core's. Goal: <= 1.02.

3. Layouts (torchrun, gloo). n=4 sequential at the shape of 1. with the same global batch:
   one process (two threads) against TP2, PP2 with the even and the balanced
   (parallel.pipeline_layers=auto) split, and DP2 (one thread per process). One torchrun per
   layout (PP2 even and balanced share one and alternate), the layouts run round-robin
   `--rounds` times. Each rank times the wall seconds inside communication: megatron-core's
   pipeline send/receive calls, the DDP bucket reductions and parameter gathers, and
   torch.distributed's blocking collectives (TP all-reduces, the grad-norm all-reduce),
   outermost call only. Compute is step minus communication. Wall time in a collective
   includes waiting for the other rank (skew, imbalance, being descheduled), so the split
   says where a rank waited, not what the transfer cost. (In one process the DDP calls still
   copy gradients and parameters locally: its small "communication" is that.)

    python benchmarks/step_time.py              # all three, ~12 min on a busy 2-core machine
    python benchmarks/step_time.py --quick      # 3 steps, one round of layouts: ~6 min
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
RESULT = ROOT / "benchmarks" / "results" / "step_time.json"

sys.path.insert(0, str(ROOT / "benchmarks"))
from _torchrun import torchrun_result  # noqa: E402

SHAPE = [
    "model.hidden_size=256",
    "model.num_attention_heads=4",
    "model.vocab_size=8000",
    "model.vocab_multiple=128",
    "model.seq_length=512",
    "train.warmup_steps=1",
    "data.synthetic=true",
    "logging.wandb=false",
]
TOTAL_LAYERS = 18
HEAD_CASES = {
    "n=1": ["model.n_future_tokens=1", f"model.num_layers={TOTAL_LAYERS - 1}"],
    "n=4 sequential": [
        "model.n_future_tokens=4",
        f"model.num_layers={TOTAL_LAYERS - 4}",
        "model.head_backward=sequential",
    ],
    "n=4 joint": [
        "model.n_future_tokens=4",
        f"model.num_layers={TOTAL_LAYERS - 4}",
        "model.head_backward=joint",
    ],
}
GPT = "plain GPTModel"
LAYOUT_MODEL = HEAD_CASES["n=4 sequential"]
LAYOUTS = {  # name: (processes, tensor, pipeline, pipeline_layers cases)
    "1 process": (1, 1, 1, ["even"]),
    "TP2": (2, 2, 1, ["even"]),
    "PP2": (2, 1, 2, ["even", "auto"]),
    "DP2": (2, 1, 1, ["even"]),
}


# ---------------------------------------------------------------- communication timing


class CommClock:
    """Wall seconds spent inside communication calls (outermost call only)."""

    def __init__(self):
        self.seconds = 0.0
        self.depth = 0

    def wrap(self, fn):
        def timed(*a, **k):
            self.depth += 1
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.depth -= 1
                if self.depth == 0:
                    self.seconds += time.perf_counter() - start

        return timed

    def install(self) -> None:
        import torch.distributed as dist
        from megatron.core.distributed import param_and_grad_buffer
        from megatron.core.pipeline_parallel import p2p_communication

        for name in ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "barrier"):
            setattr(dist, name, self.wrap(getattr(dist, name)))
        comm = p2p_communication.P2PCommunicator
        for name in list(vars(comm)):
            if name.startswith(("send_", "recv_")):
                setattr(comm, name, self.wrap(getattr(comm, name)))
        group = param_and_grad_buffer._ParamAndGradBucketGroup
        for name in (
            "start_grad_sync",
            "finish_grad_sync",
            "start_param_sync",
            "finish_param_sync",
        ):
            setattr(group, name, self.wrap(getattr(group, name)))


# ---------------------------------------------------------------- models and engines


def gpt_engine(cfg, plan, dims):
    """A MegatronEngine around a plain megatron-core GPTModel of cfg's shape (n=1): as many
    layers as our trunk and head together."""
    import dataclasses

    import torch
    from megatron.core.models.gpt import GPTModel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mtp_dist.engines.megatron import MegatronEngine
    from mtp_dist.model.model import total_layers
    from mtp_dist.model.spec import layer_spec, transformer_config
    from mtp_dist.schedule import StepResult

    m = dataclasses.replace(cfg.model, num_layers=total_layers(cfg.model))  # ours: trunk + head
    model = GPTModel(
        config=transformer_config(m, 1, 1, torch.float32, cpu=True),
        transformer_layer_spec=layer_spec(),
        vocab_size=m.padded_vocab_size,
        max_sequence_length=m.seq_length,
        share_embeddings_and_output_weights=m.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(m.rotary_base),
    )
    s = m.seq_length
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1).view(1, 1, s, s)

    def loss_func(loss):
        loss = loss.float().mean()
        return loss, {"loss": loss.detach().clone()}

    def forward_step(data_iterator, model):
        tokens = next(data_iterator)["tokens"]
        out = model(tokens[:, :s], None, mask, labels=tokens[:, 1 : s + 1])
        return out, loss_func

    class PlainGPTEngine(MegatronEngine):
        def forward_backward(self, microbatches):
            self.ddp.zero_grad_buffer()
            self.optimizer.zero_grad()
            self.ddp.train()
            stats = get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iter(microbatches),
                model=[self.ddp],
                num_microbatches=len(microbatches),
                seq_length=s,
                micro_batch_size=microbatches[0]["tokens"].shape[0],
                forward_only=False,
            )
            loss = torch.stack([x["loss"] for x in stats]).mean().item()
            return StepResult(loss, [loss])

    return PlainGPTEngine(cfg, plan, dims, model)


def batches(cfg, plan, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    width = cfg.model.seq_length + cfg.model.n_future_tokens
    mb = cfg.train.micro_batch_size
    return [
        {"tokens": torch.randint(0, cfg.model.vocab_size, (mb, width), generator=gen)}
        for _ in range(plan.num_microbatches)
    ]


def worker_single(args) -> None:
    """Measurements 1 and 2 in one process: all four engines, steps round-robin."""
    import torch.distributed as dist

    from mtp_dist import config, distributed, engines
    from mtp_dist.compat import ignore_known_warnings
    from mtp_dist.model.model import flops_per_token
    from mtp_dist.run_plan import resolve

    ignore_known_warnings()
    dims = distributed.init(1, 1, seed=1234)
    batch = [
        f"train.micro_batch_size={args.micro_batch}",
        f"train.global_batch_size={args.micro_batch * args.microbatches}",
    ]
    built = {}
    for name, keys in HEAD_CASES.items():
        cfg = config.load(None, [*SHAPE, *batch, *keys])
        plan = resolve(cfg, 1, on_gpu=False)
        engine = engines.build_engine(cfg, plan, dims, engines.build_model(cfg, plan, dims))
        built[name] = (cfg, engine, batches(cfg, plan))
    cfg = config.load(None, [*SHAPE, *batch, *HEAD_CASES["n=1"]])
    plan = resolve(cfg, 1, on_gpu=False)
    built[GPT] = (cfg, gpt_engine(cfg, plan, dims), built["n=1"][2])
    times = {name: [] for name in built}
    for i in range(args.warmup + args.steps):
        for name, (_, engine, data) in built.items():
            dist.barrier()
            start = time.perf_counter()
            engine.train_step(data)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    out = {
        name: {
            "step_seconds": times[name],
            "median_seconds": statistics.median(times[name]),
            "flops_per_token": flops_per_token(cfg.model),
            "parameters": sum(p.numel() for p in engine.model.parameters()),
        }
        for name, (cfg, engine, _) in built.items()
    }
    print("RESULT " + json.dumps(out), flush=True)
    distributed.destroy()


def worker_layout(args) -> None:
    """One layout of measurement 3 (both splits with PP); rank 0 prints the medians."""
    import torch.distributed as dist

    clock = CommClock()
    clock.install()
    from mtp_dist import config, distributed, engines
    from mtp_dist.compat import ignore_known_warnings
    from mtp_dist.model.costs import pipeline_split
    from mtp_dist.run_plan import resolve

    ignore_known_warnings()
    procs, tp, pp, splits = LAYOUTS[args.layout]
    dims = distributed.init(tp, pp, seed=1234)
    built = {}
    for split in splits:
        cfg = config.load(
            None,
            [
                *SHAPE,
                *LAYOUT_MODEL,
                f"train.micro_batch_size={args.micro_batch}",
                f"train.global_batch_size={args.global_batch}",
                f"parallel.tensor={tp}",
                f"parallel.pipeline={pp}",
                f"parallel.pipeline_layers={split}",
            ],
        )
        plan = resolve(cfg, dims.world_size, on_gpu=False)
        engine = engines.build_engine(cfg, plan, dims, engines.build_model(cfg, plan, dims))
        built[split] = (
            engine,
            batches(cfg, plan, seed=dims.dp_rank),
            pipeline_split(cfg.model, cfg.parallel),
        )
    rows = {split: {"step": [], "comm": []} for split in splits}
    for i in range(args.warmup + args.steps):
        for split, (engine, data, _) in built.items():
            dist.barrier()
            clock.seconds = 0.0
            start = time.perf_counter()
            engine.train_step(data)
            comm = clock.seconds
            dist.barrier()
            if i >= args.warmup:
                rows[split]["step"].append(time.perf_counter() - start)
                rows[split]["comm"].append(comm)
    gathered = [None] * dims.world_size
    dist.all_gather_object(gathered, rows)
    if dims.rank == 0:
        out = {
            split: {
                "split": list(built[split][2]),
                "step_seconds": gathered[0][split]["step"],
                "comm_seconds": [g[split]["comm"] for g in gathered],
            }
            for split in splits
        }
        print("RESULT " + json.dumps(out), flush=True)
    distributed.destroy()


# ---------------------------------------------------------------- driver


def launch(procs: int, threads: int, worker_args: list[str]) -> dict:
    return torchrun_result(__file__, procs, threads, worker_args, timeout=7200)


def heads_table(single: dict) -> str:
    base = single["n=1"]
    steps_n1 = base["step_seconds"]

    def paired(r: dict, over: list[float]) -> float:
        """The median over steps of the step-time ratio of two cases measured side by side."""
        return statistics.median(a / b for a, b in zip(r["step_seconds"], over, strict=True))

    lines = [
        "| case | trunk + head layers | parameters | step s (median) "
        "| measured ratio to n=1 (median of paired steps) "
        "| FLOP ratio | measured / FLOP |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in (*HEAD_CASES, GPT):
        r = single[name]
        if name == GPT:
            measured = paired(base, r["step_seconds"])
            flops = 1.0
            layers, label = f"{TOTAL_LAYERS}", "n=1 ours / plain GPTModel"
        else:
            measured = paired(r, steps_n1)
            flops = r["flops_per_token"] / base["flops_per_token"]
            n = 1 if name == "n=1" else 4
            layers, label = f"{TOTAL_LAYERS - n} + {n}", name
        lines.append(
            f"| {label} | {layers} | {r['parameters'] / 1e6:.2f} M | "
            f"{r['median_seconds']:.3f} | {measured:.3f} | {flops:.3f} | {measured / flops:.3f} |"
        )
    return "\n".join(lines)


def layouts_table(layouts: dict) -> str:
    base = statistics.median(layouts["1 process"]["even"]["step_seconds"])
    lines = [
        "| layout | trunk split | step s (median) | speed-up over 1 process "
        "| comm s per rank (median) | compute s per rank (median) |",
        "|---|---|---|---|---|---|",
    ]
    for name, (_, _, pp, splits) in LAYOUTS.items():
        for split in splits:
            r = layouts[name][split]
            step = statistics.median(r["step_seconds"])
            comm = [statistics.median(c) for c in r["comm_seconds"]]
            compute = [
                statistics.median(s - c for s, c in zip(r["step_seconds"], cs, strict=True))
                for cs in r["comm_seconds"]
            ]
            label = (
                name if pp == 1 else f"{name} {'balanced (auto)' if split == 'auto' else 'even'}"
            )
            lines.append(
                f"| {label} | {r['split']} | {step:.3f} | {base / step:.2f}x | "
                f"{' / '.join(f'{c:.3f}' for c in comm)} | "
                f"{' / '.join(f'{c:.3f}' for c in compute)} |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4, help="measured steps per layout and round")
    p.add_argument(
        "--head-steps", type=int, default=12, help="measured steps per case, measurements 1 and 2"
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="round-robin repetitions of the layouts")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--microbatches", type=int, default=2, help="per step, measurements 1 and 2")
    p.add_argument("--global-batch", type=int, default=4, help="measurement 3")
    p.add_argument("--quick", action="store_true", help="3 steps, one round")
    p.add_argument("--skip-layouts", action="store_true")
    p.add_argument("--worker", choices=["single", "layout"], help=argparse.SUPPRESS)
    p.add_argument("--layout", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker == "single":
        worker_single(args)
        return
    if args.worker == "layout":
        worker_layout(args)
        return
    if args.quick:
        args.steps, args.head_steps, args.rounds = 3, 6, 1
    common = ["--warmup", str(args.warmup), "--micro-batch", str(args.micro_batch)]
    single = launch(
        1,
        2,
        ["--worker", "single", *common, "--steps", str(args.head_steps),
         "--microbatches", str(args.microbatches)],
    )  # fmt: skip
    common += ["--steps", str(args.steps)]
    print(heads_table(single), flush=True)
    layouts: dict = {}
    if not args.skip_layouts:
        for _ in range(args.rounds):
            for name, (procs, _, _, _) in LAYOUTS.items():
                threads = 2 if procs == 1 else 1
                got = launch(
                    procs,
                    threads,
                    [
                        "--worker",
                        "layout",
                        "--layout",
                        name,
                        *common,
                        "--global-batch",
                        str(args.global_batch),
                    ],  # fmt: skip
                )
                for split, r in got.items():
                    slot = layouts.setdefault(name, {}).setdefault(
                        split, {"split": r["split"], "step_seconds": [], "comm_seconds": None}
                    )
                    slot["step_seconds"] += r["step_seconds"]
                    if slot["comm_seconds"] is None:
                        slot["comm_seconds"] = r["comm_seconds"]
                    else:
                        for mine, theirs in zip(
                            slot["comm_seconds"], r["comm_seconds"], strict=True
                        ):
                            mine += theirs
        print(layouts_table(layouts))
    cores = os.cpu_count()
    print(f"CPU, fp32, gloo, {cores} cores shared with other jobs.")
    from mtp_dist.files import atomic_write_json

    payload = {
        "shape": SHAPE,
        "total_layers": TOTAL_LAYERS,
        "steps": args.steps,
        "head_steps": args.head_steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "micro_batch": args.micro_batch,
        "microbatches_single": args.microbatches,
        "global_batch_layouts": args.global_batch,
        "cpu_count": cores,
        "heads_and_wrapper": single,
        "layouts": layouts,
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULT, payload)
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
