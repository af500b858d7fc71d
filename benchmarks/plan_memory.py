"""The planner against measurement on this CPU: peak memory of one training step, FLOPs per
token, and the paper's Table S5 overheads next to the planner's FLOP ratios.

Memory: each case runs in its own child process (this script with --case); one step (forward +
backward, no optimizer) of a single-process fp32 model, measured as in head_memory.py (peak RSS
above the RSS before the step, after a warm-up step, gradients freed). Planned: the planner's
terms for that step (stage_memory: trunk activations, the heads, the logits) plus the fp32
gradients (4 bytes per parameter); weights and megatron-core's attention buffer exist before
the step and are not in either figure. The planner's terms are upper bounds summed over the
step; the real peak comes at one moment of it.

FLOPs: torch.utils.flop_counter.FlopCounterMode over one training step, against
mtp_dist.model.model.flops_per_token x tokens (the counter counts every matmul; the planner's
attention scores do not discount the causal mask, and neither does the local attention).

    python benchmarks/plan_memory.py          # table + benchmarks/results/plan_memory.json
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
SHAPE = dict(hidden=256, heads=4, trunk_layers=4, seq=512, micro_batch=4, vocab=32000)
TABLE_S5 = {"0.3b": 1.22, "0.6b": 1.13, "1.3b": 1.12, "3b": 1.07, "7b": 1.07, "13b": 1.09}
"""Training time of n=4 relative to n=1 (Gloeckle et al. 2024, Table S5)."""


def model_config(case: str):
    from mtp_dist.config import ModelConfig

    c = CASES[case]
    return ModelConfig(
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
        recompute=CASES[case]["recompute"],
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
    from mtp_dist.model.model import build_model, flops_per_token
    from mtp_dist.model.weights import init_weights

    ignore_known_warnings()
    os.environ.setdefault("MASTER_PORT", str(distributed.free_port()))
    distributed.init(1, 1, seed=1)
    m = model_config(case)
    model = build_model(m, recompute=CASES[case]["recompute"])
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
    }


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
    p.add_argument("--case", choices=sorted(CASES))
    p.add_argument("--out", type=Path, default=RESULT)
    args = p.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    rows = []
    for case in CASES:
        out = subprocess.run(
            [sys.executable, __file__, "--case", case], env=env, capture_output=True, text=True
        )
        if out.returncode != 0:
            raise RuntimeError(f"case {case} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        "One training step (fwd+bwd, no optimizer), fp32, 1 process; hidden {hidden}, "
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
    seq, joint = (next(r for r in rows if r["case"] == c) for c in ("n4_seq", "n4_joint"))
    diff_measured = joint["measured_peak_mib"] - seq["measured_peak_mib"]
    diff_planned = joint["planned_total_mib"] - seq["planned_total_mib"]
    print(
        f"\njoint - sequential (heads + logits terms isolated): measured {diff_measured:.1f} MiB, "
        f"planned {diff_planned:.1f} MiB, ratio {diff_planned / diff_measured:.3f}"
    )
    print("\n| case | FLOPs/token counted (FlopCounterMode) | planned | planned / counted |")
    print("|---|---|---|---|")
    for r in rows:
        if r["case"].endswith("recompute"):
            continue
        ratio = r["planned_flops_per_token"] / r["counted_flops_per_token"]
        print(
            f"| {r['case']} | {r['counted_flops_per_token']:.4g} | "
            f"{r['planned_flops_per_token']:.4g} | {ratio:.4f} |"
        )
    s5 = table_s5()
    print("\n| size | Table S5 time n=4 / n=1 | planned FLOPs n=4 / n=1 |")
    print("|---|---|---|")
    for r in s5:
        print(f"| {r['size']} | {r['paper_time_ratio']:.2f} | {r['planned_flop_ratio']:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"shape": SHAPE, "rows": rows, "table_s5": s5}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
