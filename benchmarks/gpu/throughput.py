"""Training throughput on one GPU (issue 19, item 7): tokens/s, MFU and peak memory of the
paper's 0.3B and 1.3B shapes at seq 4096 in bf16.

Per shape: n=1 against the parameter-matched n=4 (sequential and joint heads), n=1 with
megatron-core's attention against sdpa, and Hugging Face transformers' LlamaForCausalLM of the
n=1 shape (sdpa attention, torch AdamW, the same micro batch) as the reference a user would
otherwise pick. The micro batch is the largest power of two (up to --max-micro-batch) at which
n=1 fits; every case of the shape runs at it (a case that does not fit says so). Each case runs
in its own child process (a clean allocator), on the megatron engine's whole train step
(schedule, DDP, distributed optimizer), --warmup steps then the median of --steps.

MFU: the model's FLOPs per token (attention and heads included: mtp_dist.model.model.
flops_per_token; the Llama reference is the n=1 shape, so the same) times tokens/s, against the
GPU's measured bf16 matmul rate (an 8192^3 matmul) and against its datasheet dense bf16 peak.
Goals printed next to the results: n=1 at 1.3B >= 40% MFU of the datasheet peak; our n=1
tokens/s >= 1.1x transformers'; n=4 / n=1 step time <= 1.02x the FLOP ratio; n=4 sequential
peak <= 1.05x n=1's.

    python benchmarks/gpu/throughput.py --out benchmarks/gpu/out/throughput.json
    python benchmarks/gpu/throughput.py --tiny --out /tmp/t.json     # CPU, a few seconds/case
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

ROOT = Path(__file__).resolve().parents[2]
SHAPES = {"0.3b": "configs/paper/0.3b-n{n}.yaml", "1.3b": "configs/paper/1.3b-n{n}.yaml"}
CASES = ("n1", "n4_seq", "n4_joint", "n1_megatron", "hf_llama")
GiB = 2**30
GOALS = {"mfu_1.3b_n1": 0.40, "ours_over_hf": 1.1, "n4_time_over_flops": 1.02, "n4_seq_peak": 1.05}


def load_config(shape: str, case: str, seq: int, micro_batch: int, dtype: str):
    """The run config of one case: the paper's YAML of the shape (tiny: configs/tiny.yaml with
    5 layers in all), one GPU, one microbatch per step, synthetic data."""
    from mtp_dist import config

    n = 1 if case in ("n1", "n1_megatron", "hf_llama") else 4
    if shape == "tiny":
        path, extra = ROOT / "configs/tiny.yaml", [f"model.n_future_tokens={n}",
                                                   f"model.num_layers={5 - n}",
                                                   "model.head_loss_weights=null"]  # fmt: skip
    else:
        path, extra = ROOT / SHAPES[shape].format(n=n), []
    return config.load(path, [
        *extra,
        f"model.seq_length={seq}",
        f"model.head_backward={'joint' if case == 'n4_joint' else 'sequential'}",
        f"model.attention={'megatron' if case == 'n1_megatron' else 'sdpa'}",
        "parallel.tensor=1", "parallel.pipeline=1",
        f"train.micro_batch_size={micro_batch}", f"train.global_batch_size={micro_batch}",
        f"train.dtype={dtype}", "data.synthetic=true", "data.tokenizer=null",
        "logging.wandb=false",
    ])  # fmt: skip


def ours(cfg):
    """A step function over the megatron engine (its whole train step)."""
    import torch

    from mtp_dist import distributed, engines
    from mtp_dist.run_plan import resolve

    dims = distributed.init(1, 1, seed=1)
    plan = resolve(cfg, 1, on_gpu=torch.cuda.is_available())
    engine = engines.build_engine(cfg, plan, dims, engines.build_model(cfg, plan, dims))
    m, mb = cfg.model, cfg.train.micro_batch_size
    gen = torch.Generator().manual_seed(0)
    shape = (mb, m.seq_length + m.n_future_tokens)
    batch = [{"tokens": torch.randint(0, m.vocab_size, shape, generator=gen)}]
    return lambda: engine.train_step(batch)


def hf_llama(cfg):
    """transformers' LlamaForCausalLM of the n=1 shape (trunk + head 1 = num_layers + 1
    layers), sdpa attention, torch AdamW with the trainer's settings."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    m, micro_batch, t = cfg.model, cfg.train.micro_batch_size, cfg.train

    device = "cuda" if torch.cuda.is_available() else "cpu"
    llama = LlamaConfig(
        vocab_size=m.padded_vocab_size, hidden_size=m.hidden_size,
        intermediate_size=m.ffn_size, num_hidden_layers=m.num_layers + 1,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups or m.num_attention_heads,
        max_position_embeddings=m.seq_length, rms_norm_eps=m.norm_epsilon,
        rope_theta=m.rotary_base, tie_word_embeddings=False, attn_implementation="sdpa",
    )  # fmt: skip
    torch_dtype = torch.bfloat16 if t.dtype == "bf16" else torch.float32
    model = LlamaForCausalLM(llama).to(device=device, dtype=torch_dtype)
    opt = torch.optim.AdamW(
        model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay
    )
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, m.vocab_size, (micro_batch, m.seq_length), generator=gen)

    def step():
        ids = tokens.to(device)
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure(args) -> dict:
    """One case in this process: the step's median time and peak memory at --micro-batch, or
    {"oom": true}."""
    import torch

    from mtp_dist.compat import ignore_known_warnings
    from mtp_dist.model.model import flops_per_token

    ignore_known_warnings()
    cuda = torch.cuda.is_available()
    dtype = "bf16" if cuda else "fp32"
    cfg = load_config(args.shape, args.case, args.seq, args.micro_batch, dtype)
    m = cfg.model
    build = hf_llama if args.case == "hf_llama" else ours
    try:
        step = build(cfg)
        for _ in range(args.warmup):
            step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError:
        return {"oom": True}
    seconds = statistics.median(times)
    tokens = args.micro_batch * m.seq_length
    return {
        "oom": False,
        "step_s": seconds,
        "steps_s": times,
        "tokens_per_s": tokens / seconds,
        "model_flops_per_s": flops_per_token(m) * tokens / seconds,
        "flops_per_token": flops_per_token(m),
        "peak_gib": torch.cuda.max_memory_allocated() / GiB if cuda else None,
        "dtype": dtype,
    }


def child(shape: str, case: str, micro_batch: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", "--shape", shape, "--case", case,
           "--micro-batch", str(micro_batch), "--seq", str(args.seq), "--steps", str(args.steps),
           "--warmup", str(args.warmup)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MASTER_PORT", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        fail(f"{shape} {case} failed (its output above)", status=1)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return {"shape": shape, "case": case, "micro_batch": micro_batch,
            **json.loads(line.removeprefix("RESULT "))}  # fmt: skip


def matmul_rate() -> tuple[float, float | None, str]:
    """(measured matmul FLOP/s, datasheet peak or None, device name): bf16 8192^3 on a GPU,
    fp32 1024^3 on a CPU."""
    import torch

    from mtp_dist.metrics import GPU_PEAK_BF16, measure_matmul_flops

    if not torch.cuda.is_available():
        return measure_matmul_flops(), None, "cpu"
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    a @ b
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    name = torch.cuda.get_device_name()
    peak = next((p for key, p in GPU_PEAK_BF16 if key in name), None)
    return 2.0 * n**3 / best, peak, name


def largest_micro_batch(shape: str, args) -> tuple[int, dict]:
    """The largest power of two up to --max-micro-batch at which n=1 fits, and its row."""
    mb = args.max_micro_batch
    while mb >= 1:
        row = child(shape, "n1", mb, args)
        if not row["oom"]:
            return mb, row
        mb //= 2
    fail(f"{shape} n=1 does not fit at micro batch 1", status=1)


def derived(rows: list[dict], shape: str) -> dict:
    """The comparisons the goals are about, for one shape (None where a case did not fit)."""
    r = {x["case"]: x for x in rows if x["shape"] == shape and not x["oom"]}

    def ratio(a, b, key):
        return r[a][key] / r[b][key] if a in r and b in r and r[b][key] else None

    return {
        "n4_seq_time_over_n1": ratio("n4_seq", "n1", "step_s"),
        "flop_ratio_n4_over_n1": ratio("n4_seq", "n1", "flops_per_token"),
        "n4_joint_time_over_n1": ratio("n4_joint", "n1", "step_s"),
        "n4_seq_peak_over_n1": ratio("n4_seq", "n1", "peak_gib"),
        "n4_joint_peak_over_n1": ratio("n4_joint", "n1", "peak_gib"),
        "sdpa_time_over_megatron": ratio("n1", "n1_megatron", "step_s"),
        "sdpa_peak_over_megatron": ratio("n1", "n1_megatron", "peak_gib"),
        "ours_tokens_over_hf": ratio("n1", "hf_llama", "tokens_per_s"),
    }


def fail(message: str, status: int = 2) -> None:
    """One line on stderr and the exit status: 2 for bad input, 1 for a failed case."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(status)


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(result: dict) -> None:
    rate, peak = result["matmul_flops"], result["datasheet_peak_flops"]
    print(f"device {result['device']}; measured matmul {rate / 1e12:.1f} TFLOP/s; datasheet "
          f"peak {fmt(peak and peak / 1e12, '.0f')} TFLOP/s; seq {result['seq']}")  # fmt: skip
    print("| shape | case | micro batch | step s | tokens/s | MFU (measured) | MFU (datasheet) "
          "| peak GiB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        if r["oom"]:
            print(f"| {r['shape']} | {r['case']} | {r['micro_batch']} | out of memory |||||")
            continue
        print(f"| {r['shape']} | {r['case']} | {r['micro_batch']} | {r['step_s']:.3f} | "
              f"{r['tokens_per_s']:,.0f} | {r['mfu_measured']:.1%} | "
              f"{fmt(r['mfu_datasheet'], '.1%')} | {fmt(r['peak_gib'], '.1f')} |")  # fmt: skip
    for shape, d in result["derived"].items():
        f = {k: fmt(v, ".3f") for k, v in d.items()}
        print(
            f"{shape}: n4/n1 step time {f['n4_seq_time_over_n1']} against the FLOP ratio "
            f"{f['flop_ratio_n4_over_n1']} (goal: <= {GOALS['n4_time_over_flops']}x the ratio), "
            f"joint {f['n4_joint_time_over_n1']}; n4 seq peak / n1 {f['n4_seq_peak_over_n1']} "
            f"(goal <= {GOALS['n4_seq_peak']}), joint {f['n4_joint_peak_over_n1']}; sdpa / "
            f"megatron time {f['sdpa_time_over_megatron']}, peak "
            f"{f['sdpa_peak_over_megatron']}; ours / transformers tokens/s "
            f"{f['ours_tokens_over_hf']} (goal >= {GOALS['ours_over_hf']})"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), help="0.3b 1.3b (default both)")
    p.add_argument("--tiny", action="store_true", help="the tiny shape only (CPU check)")
    p.add_argument("--seq", type=int, help="sequence length (default 4096; --tiny: 64)")
    p.add_argument("--max-micro-batch", type=int, default=16, help="largest tried (16)")
    p.add_argument("--steps", type=int, default=5, help="measured steps per case (5)")
    p.add_argument("--warmup", type=int, default=2, help="steps before measuring (2)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/gpu/out/throughput.json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    p.add_argument("--micro-batch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.seq = args.seq or (64 if args.tiny else 4096)
    shapes = ["tiny"] if args.tiny else args.shapes
    bad = [s for s in shapes if s not in SHAPES and s != "tiny"]
    if bad:
        fail(f"unknown shape {bad[0]!r}; choose from {', '.join(SHAPES)}")
    for name in ("seq", "max_micro_batch", "steps"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1")
    if args.child:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return
    rate, peak, device = matmul_rate()
    rows = []
    for shape in shapes:
        mb, first = largest_micro_batch(shape, args)
        rows.append(first)
        rows += [child(shape, case, mb, args) for case in CASES[1:]]
    for r in rows:
        if not r["oom"]:
            r["mfu_measured"] = r["model_flops_per_s"] / rate
            r["mfu_datasheet"] = r["model_flops_per_s"] / peak if peak else None
    result = {
        "device": device, "matmul_flops": rate, "datasheet_peak_flops": peak, "seq": args.seq,
        "rows": rows, "derived": {s: derived(rows, s) for s in shapes}, "goals": GOALS,
    }  # fmt: skip
    table(result)
    sys.path.insert(0, str(ROOT))
    from mtp_dist.files import atomic_write_json

    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
