"""The planner against measurement on this CPU: peak memory of one training step, FLOPs per
token, and the paper's Table S5 overheads next to the planner's FLOP ratios.

Memory: each case runs in its own child process (this script with --case); one step (forward +
backward, no optimizer) of a single-process fp32 model, measured as in head_memory.py (peak RSS
above the RSS before the step, after a warm-up step, gradients freed). Planned: the planner's
terms for that step (stage_memory: trunk activations, the heads, the logits) plus the fp32
gradients (4 bytes per parameter); weights and megatron-core's attention buffer exist before
the step and are not in either figure. The planner's terms are upper bounds summed over the
step; the real peak comes at one moment of it. Every case runs under both core attentions
(model.attention: sdpa, and megatron-core's, whose case names end in "_megatron"); `--only`
measures a subset.

Under torchrun (gloo, CPU; each case its own torchrun, one rank per process): n=4 sequential
at TP1, TP2 and PP2, the megatron engine's forward_backward (1F1B under PP), each rank's peak
measured the same way, against the planner's per-rank plan for that rank's stage
(plan/layouts.plan, as `python -m mtp_dist.plan` computes it): activations, heads and logits
(the heads and logits on the last stage only). The fp32 gradients go to DDP's buffers,
allocated when the engine is built, so neither figure has them. Differences isolate terms: PP2
stage 1 minus stage 0 is the heads and logits (both stages hold the same trunk layers); TP1
minus a TP2 rank is the half of the sharded terms that TP takes off a rank.

FLOPs: torch.utils.flop_counter.FlopCounterMode over one training step, against
mtp_dist.model.model.flops_per_token x tokens (the counter counts every matmul; the planner's
attention scores do not discount the causal mask, and neither does the local attention).

    python benchmarks/plan_memory.py          # table + benchmarks/results/plan_memory.json
    python benchmarks/plan_memory.py --only n1 n1_megatron --out /tmp/plan_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULT = Path(__file__).resolve().parent / "results" / "plan_memory.json"
MiB = 2**20
CASES = {
    "n1": dict(n=1, mode="sequential", recompute=False),
    "n4_seq": dict(n=4, mode="sequential", recompute=False),
    "n4_joint": dict(n=4, mode="joint", recompute=False),
    "n4_seq_recompute": dict(n=4, mode="sequential", recompute=True),
    "n1_recompute": dict(n=1, mode="sequential", recompute=True),
}
DIST_CASES = {
    "n4_seq_tp1": dict(tensor=1, pipeline=1),
    "n4_seq_tp2": dict(tensor=2, pipeline=1),
    "n4_seq_pp2": dict(tensor=1, pipeline=2),
}
"""Under torchrun (gloo, CPU), one rank per process: n=4 sequential with a 4-layer trunk (PP2
puts 2 layers on each stage; the heads, final norm and unembedding on stage 1)."""
ATTENTION = ("sdpa", "megatron")
"""Every case runs under both core attentions (model.attention); a megatron case's name ends in
"_megatron"."""
SHAPE = dict(hidden=256, heads=4, trunk_layers=4, seq=512, micro_batch=4, vocab=32000)
TABLE_S5 = {"0.3b": 1.22, "0.6b": 1.13, "1.3b": 1.12, "3b": 1.07, "7b": 1.07, "13b": 1.09}
"""Training time of n=4 relative to n=1 (Gloeckle et al. 2024, Table S5)."""


def split_case(case: str) -> tuple[str, str]:
    """ "n4_seq_megatron" -> ("n4_seq", "megatron"); "n4_seq" -> ("n4_seq", "sdpa")."""
    base = case.removesuffix("_megatron")
    return base, "megatron" if base != case else "sdpa"


def all_cases(cases: dict) -> list[str]:
    return [c if a == "sdpa" else f"{c}_{a}" for c in cases for a in ATTENTION]


def model_config(case: str):
    from mtp_dist.config import ModelConfig

    case, attention = split_case(case)
    c = CASES[case]
    return ModelConfig(
        attention=attention,
        n_future_tokens=c["n"],
        num_layers=SHAPE["trunk_layers"] + 1 - c["n"] if c["n"] > 1 else SHAPE["trunk_layers"],
        hidden_size=SHAPE["hidden"],
        num_attention_heads=SHAPE["heads"],
        vocab_size=SHAPE["vocab"],
        seq_length=SHAPE["seq"],
        head_backward=c["mode"],
    )


def planned(case: str) -> dict:
    from mtp_dist.model.costs import stage_costs
    from mtp_dist.plan.memory import stage_memory

    m = model_config(case)
    (stage,) = stage_costs(m)
    mem = stage_memory(
        m,
        stage=0,
        pipeline=1,
        trunk_layers=m.num_layers,
        params=stage.params_per_rank,
        tensor=1,
        dp=1,
        micro_batch=SHAPE["micro_batch"],
        num_microbatches=1,
        recompute=CASES[split_case(case)[0]]["recompute"],
        bf16=False,
        engine="megatron",
        zero_stage=1,
        largest_layer=0,
        last=True,
    )
    terms = {t.name: t.bytes for t in mem.terms if t.name in ("activations", "heads", "logits")}
    terms["gradients"] = 4 * stage.params_per_rank
    return terms


def run_case(case: str) -> dict:
    import torch
    from head_memory import _CpuPeak

    from mtp_dist import distributed
    from mtp_dist.compat import ignore_known_warnings
    from mtp_dist.model.model import build_model, flops_per_token, total_layers
    from mtp_dist.model.spec import attention_score_flops_per_token
    from mtp_dist.model.weights import init_weights

    ignore_known_warnings()
    distributed.init(1, 1, seed=1)
    m = model_config(case)
    model = build_model(m, recompute=CASES[split_case(case)[0]]["recompute"])
    init_weights(model, seed=1)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(
        0, m.vocab_size, (SHAPE["micro_batch"], m.seq_length + m.n_future_tokens), generator=gen
    )

    def step():
        model(tokens).loss.backward()

    step()
    for p in model.parameters():
        p.grad = None
    with _CpuPeak() as meter:
        step()
    for p in model.parameters():
        p.grad = None
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    tokens_per_step = SHAPE["micro_batch"] * m.seq_length
    return {
        "case": case,
        "measured_peak_mib": meter.peak / MiB,
        "planned_mib": {k: v / MiB for k, v in planned(case).items()},
        "counted_flops_per_token": counter.get_total_flops() / tokens_per_step,
        "planned_flops_per_token": flops_per_token(m),
        "planned_score_flops_per_token": total_layers(m) * attention_score_flops_per_token(m),
    }


def dist_config(case: str):
    from mtp_dist import config

    base, attention = split_case(case)
    c = DIST_CASES[base]
    return config.load(
        None,
        [
            f"model.attention={attention}",
            "model.n_future_tokens=4",
            f"model.num_layers={SHAPE['trunk_layers']}",
            f"model.hidden_size={SHAPE['hidden']}",
            f"model.num_attention_heads={SHAPE['heads']}",
            f"model.vocab_size={SHAPE['vocab']}",
            f"model.seq_length={SHAPE['seq']}",
            "model.head_backward=sequential",
            f"train.micro_batch_size={SHAPE['micro_batch']}",
            f"train.global_batch_size={SHAPE['micro_batch']}",
            "train.dtype=fp32",
            "engine=megatron",
            f"parallel.tensor={c['tensor']}",
            f"parallel.pipeline={c['pipeline']}",
            "parallel.pipeline_layers=even",
            "data.synthetic=true",
            "logging.wandb=false",
        ],
    )


def dist_planned(cfg, run) -> list[dict]:
    """The planner's terms of one step for every pipeline stage (layouts.plan, as the CLI)."""
    from mtp_dist.plan import layouts

    lp = layouts.plan(cfg, run, layouts.Hardware(gpus=run.world_size))
    return [
        {t.name: t.bytes for t in mem.terms if t.name in ("activations", "heads", "logits")}
        for mem in lp.memory
    ]


def dist_worker(case: str) -> None:
    """One torchrun rank: the megatron engine's forward_backward (1F1B under PP; gradients into
    DDP's fp32 buffers, allocated at build, so not in the step's peak), a warm-up step, then one
    measured step; rank 0 prints every rank's row."""
    import torch
    import torch.distributed as dist
    from head_memory import _CpuPeak

    from mtp_dist import distributed, engines
    from mtp_dist.compat import ignore_known_warnings
    from mtp_dist.run_plan import resolve

    ignore_known_warnings()
    cfg = dist_config(case)
    dims = distributed.init(cfg.parallel.tensor, cfg.parallel.pipeline, seed=1)
    run = resolve(cfg, dims.world_size, on_gpu=False)
    engine = engines.build_engine(cfg, run, dims, engines.build_model(cfg, run, dims))
    gen = torch.Generator().manual_seed(0)
    m = cfg.model
    batch = [
        {"tokens": torch.randint(0, m.vocab_size, (run.micro_batch_size, m.seq_length + 4),
                                 generator=gen)}
        for _ in range(run.num_microbatches)
    ]  # fmt: skip
    engine.forward_backward(batch)
    dist.barrier()
    with _CpuPeak() as meter:
        engine.forward_backward(batch)
    row = {"rank": dims.rank, "tp_rank": dims.tp_rank, "pp_rank": dims.pp_rank,
           "measured_peak_mib": meter.peak / MiB}  # fmt: skip
    rows = [None] * dims.world_size
    dist.all_gather_object(rows, row)
    if dims.rank == 0:
        planned_stages = dist_planned(cfg, run)
        for r in rows:
            r["planned_mib"] = {k: v / MiB for k, v in planned_stages[r["pp_rank"]].items()}
        print("RESULT " + json.dumps({"case": case, "ranks": rows}), flush=True)
    distributed.destroy()


def launch_dist(case: str, env: dict) -> dict:
    from mtp_dist.distributed import free_port

    c = DIST_CASES[split_case(case)[0]]
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc-per-node={c['tensor'] * c['pipeline']}", f"--master-port={free_port()}",
        __file__, "--dist-case", case,
    ]  # fmt: skip
    out = subprocess.run(cmd, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{out.stdout[-2000:]}{out.stderr[-3000:]}")
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def dist_table(results: list[dict]) -> None:
    """Per rank planned against measured, then the differences that isolate terms."""
    print(
        "\nUnder torchrun (gloo, CPU, one rank per process; megatron engine, forward_backward "
        "only; core attention sdpa, or megatron-core's for cases ending in _megatron): n=4 "
        "sequential, trunk {trunk_layers} layers, hidden {hidden}, {heads} heads, seq "
        "{seq}, micro batch {micro_batch}, 1 microbatch, V {vocab}; planned = the planner's "
        "activations, heads and logits for the rank's stage (the fp32 gradients go to DDP's "
        "buffer, allocated before the step)".format(**SHAPE)
    )
    print(
        "| case | rank (TP rank, PP stage) | measured peak MiB | planned MiB | planned / measured "
        "| activations | heads | logits |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for res in results:
        for r in res["ranks"]:
            pl = r["planned_mib"]
            r["planned_total_mib"] = sum(pl.values())
            r["ratio"] = r["planned_total_mib"] / r["measured_peak_mib"]
            print(
                f"| {res['case']} | {r['rank']} ({r['tp_rank']}, {r['pp_rank']}) | "
                f"{r['measured_peak_mib']:.1f} | {r['planned_total_mib']:.1f} | {r['ratio']:.3f} | "
                f"{pl.get('activations', 0):.1f} | {pl.get('heads', 0):.1f} | "
                f"{pl.get('logits', 0):.1f} |"
            )
    by_case = {res["case"]: res["ranks"] for res in results}
    pairs = []
    for suffix in ("", "_megatron"):
        pp2, tp1, tp2 = (by_case.get(f"n4_seq_{x}{suffix}") for x in ("pp2", "tp1", "tp2"))
        if pp2:
            pairs.append((f"PP2{suffix} stage 1 - stage 0 (heads + logits: both stages hold 2 "
                          "trunk layers)", pp2[1], pp2[0]))  # fmt: skip
        if tp1 and tp2:
            pairs.append((f"TP1 - TP2{suffix} rank 0 (the half of the sharded terms TP takes "
                          "off a rank)", tp1[0], tp2[0]))  # fmt: skip
    for label, a, b in pairs:
        measured = a["measured_peak_mib"] - b["measured_peak_mib"]
        planned_diff = a["planned_total_mib"] - b["planned_total_mib"]
        print(
            f"{label}: measured {measured:.1f} MiB, planned {planned_diff:.1f} MiB, "
            f"ratio {planned_diff / measured:.3f}"
        )


def table_s5() -> list[dict]:
    from mtp_dist import config
    from mtp_dist.model.model import flops_per_token

    root = Path(__file__).resolve().parent.parent / "configs" / "paper"
    rows = []
    for size, paper in TABLE_S5.items():
        one, four = (config.load(root / f"{size}-n{n}.yaml").model for n in (1, 4))
        rows.append(
            {"size": size, "paper_time_ratio": paper,
             "planned_flop_ratio": flops_per_token(four) / flops_per_token(one)}
        )  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--case", choices=all_cases(CASES))
    p.add_argument("--dist-case", choices=all_cases(DIST_CASES))
    p.add_argument(
        "--only",
        nargs="+",
        metavar="CASE",
        help="measure only these cases (single-process or torchrun; default: all)",
    )
    p.add_argument("--out", type=Path, default=RESULT)
    args = p.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case)))
        return
    if args.dist_case:
        dist_worker(args.dist_case)
        return
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(
        os.environ,
        MALLOC_MMAP_THRESHOLD_="65536",
        MALLOC_TRIM_THRESHOLD_="65536",
        PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    )
    wanted = set(args.only or all_cases(CASES) + all_cases(DIST_CASES))
    unknown = wanted - set(all_cases(CASES) + all_cases(DIST_CASES))
    if unknown:
        p.error(
            f"unknown case(s) {sorted(unknown)}; choose from {all_cases(CASES)} and "
            f"{all_cases(DIST_CASES)}"
        )
    rows = []
    for case in (c for c in all_cases(CASES) if c in wanted):
        out = subprocess.run(
            [sys.executable, __file__, "--case", case], env=env, capture_output=True, text=True
        )
        if out.returncode != 0:
            raise RuntimeError(f"case {case} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        "One training step (fwd+bwd, no optimizer), fp32, 1 process, core attention sdpa "
        "(cases ending in _megatron: megatron-core's); hidden {hidden}, "
        "{heads} heads, depth {trunk_layers}+1 (trunk = depth - n), seq {seq}, micro batch "
        "{micro_batch}, V {vocab}".format(**SHAPE)
    )
    print(
        "| case | measured peak MiB | planned MiB | planned / measured | activations | heads "
        "| logits | gradients |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        pl = r["planned_mib"]
        total = sum(pl.values())
        r["planned_total_mib"] = total
        r["ratio"] = total / r["measured_peak_mib"]
        print(
            f"| {r['case']} | {r['measured_peak_mib']:.1f} | {total:.1f} | {r['ratio']:.3f} | "
            f"{pl['activations']:.1f} | {pl['heads']:.1f} | {pl['logits']:.1f} | "
            f"{pl['gradients']:.1f} |"
        )
    by_name = {r["case"]: r for r in rows}
    for suffix in ("", "_megatron"):
        seq, joint = by_name.get(f"n4_seq{suffix}"), by_name.get(f"n4_joint{suffix}")
        if not (seq and joint):
            continue
        diff_measured = joint["measured_peak_mib"] - seq["measured_peak_mib"]
        diff_planned = joint["planned_total_mib"] - seq["planned_total_mib"]
        print(
            f"\njoint - sequential{suffix} (heads + logits terms isolated): measured "
            f"{diff_measured:.1f} MiB, planned {diff_planned:.1f} MiB, "
            f"ratio {diff_planned / diff_measured:.3f}"
        )
    dist_results = [launch_dist(c, env) for c in all_cases(DIST_CASES) if c in wanted]
    if dist_results:
        dist_table(dist_results)
    print(
        "\nFLOPs: FlopCounterMode has no formula for the CPU flash-attention kernel, so an sdpa "
        "row's count lacks the attention scores' matmuls; `+ scores` adds the planner's "
        "attention-score FLOPs to it (the model's FLOPs do not depend on the kernel)."
    )
    print("| case | FLOPs/token counted (FlopCounterMode) | planned | planned / counted |")
    print("|---|---|---|---|")
    for r in rows:
        if split_case(r["case"])[0].endswith("recompute"):
            continue
        counted, note = r["counted_flops_per_token"], ""
        if split_case(r["case"])[1] == "sdpa":
            counted += r["planned_score_flops_per_token"]
            note = " + scores"
        ratio = r["planned_flops_per_token"] / counted
        print(
            f"| {r['case']} | {counted:.4g}{note} | "
            f"{r['planned_flops_per_token']:.4g} | {ratio:.4f} |"
        )
    s5 = table_s5()
    print("\n| size | Table S5 time n=4 / n=1 | planned FLOPs n=4 / n=1 |")
    print("|---|---|---|")
    for r in s5:
        print(f"| {r['size']} | {r['paper_time_ratio']:.2f} | {r['planned_flop_ratio']:.3f} |")
    from mtp_dist.files import atomic_write_json

    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        args.out, {"shape": SHAPE, "rows": rows, "torchrun": dist_results, "table_s5": s5}
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
