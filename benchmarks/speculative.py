"""Benchmark: self-speculative decoding of an n=4 code model, next to the paper's Table S2.

Model: the README demo's pipeline (`python -m mtp_dist.demo --workdir W`: the running Python's
standard-library sources, an 8k BPE tokenizer, configs/small.yaml, n=4) trained for --steps
steps; a finished run in W is reused.
Prompts: held out, i.e. standard-library files the corpus does not contain (the corpus takes the
sorted files up to its size budget, these come after); --prompt-tokens tokens from a seeded line
of each.
Decoding: greedy (k=1) and self-speculative with k=2,3,4 heads, batch 1 (and --batch B), no stop
at end of document, --new-tokens tokens each, all with the decoder's packed weights; and greedy
with megatron-core's own matmuls, to show what packing gives. Every method's tokens are checked
to be greedy's. Each method's time is the best of --repeats runs, the methods interleaved.

The speedup over greedy cannot exceed tokens per forward; speedup / tokens-per-forward is the
cost of a greedy forward relative to a verifying one (1.0 = verifying is free). It has an
architectural part: a verifying forward runs k head layers where greedy runs one, i.e.
(L + 1) / (L + k) of the layers for a trunk of L layers if a layer's cost does not depend on its
few tokens, as on a GPU and with packed weights on a CPU (the paper's 7B model: 32 - 4 trunk
layers; this model: 4). "Of the bound" is the rest: speedup / (tokens per forward x that
bound), 1.0 when the implementation adds nothing. A second table times a verifying forward
against a greedy one for untrained models of this width at deeper trunks (--depths).

    python benchmarks/speculative.py [--workdir runs/speculative] [--steps 600] [--prompts 12]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULT = Path(__file__).resolve().parent / "results" / "speculative.json"

PAPER_TABLE_S2_CODE = {2: (1.85, 1.94), 3: (2.54, 2.78), 4: (3.05, 3.50)}
"""7B n=4 code model, heads used -> (speedup, tokens per forward): Gloeckle et al. 2024, S2."""


def last_records(run: Path) -> list[dict]:
    """metrics.jsonl, the last record of each step (a resumed run repeats steps)."""
    by_step = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]


def train(workdir: Path, steps: int, nproc: int, reuse: bool) -> str:
    """The demo's pipeline to `steps` steps (skipped stages, a resumed or finished run are the
    demo's own behaviour), or with `reuse` the run's latest checkpoint as it is; returns the
    training command."""
    overrides = [f"train.steps={steps}", "train.lr=2e-3", "train.eval_interval=100",
                 "checkpoint.interval=50", "checkpoint.keep=2", "logging.wandb=false"]  # fmt: skip
    cmd = [sys.executable, "-m", "mtp_dist.demo", "--workdir", str(workdir),
           "--nproc", str(nproc), *overrides]  # fmt: skip
    if not reuse:
        subprocess.run(cmd, check=True)
    return " ".join(cmd)


def training_summary(run: Path, step: int, command: str) -> dict:
    """What training took up to the checkpoint at `step` (from the run's metrics)."""
    records = [r for r in last_records(run) if r["step"] <= step]
    evals = [r for r in records if "eval_head_accuracy" in r]
    return {
        "steps": step,
        "train_seconds": sum(r["step_time_s"] for r in records),
        "tokens_per_s": records[-1]["tokens_per_s"],
        "final_head_losses": records[-1]["head_losses"],
        "eval_step": evals[-1]["step"] if evals else None,
        "eval_head_accuracy": evals[-1]["eval_head_accuracy"] if evals else None,
        "command": command,
    }


def held_out_prompts(workdir: Path, tokenizer, count: int, length: int, need: int, seed: int):
    """`count` windows of `need` tokens from standard-library files the corpus does not hold,
    each starting at a seeded line; the prompt is its first `length` tokens."""
    import sysconfig

    from data_prep.stdlib_corpus import stdlib_files

    root = sysconfig.get_paths()["stdlib"]
    seen = set()
    for path in sorted((workdir / "corpus").glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            seen.update(json.loads(line)["path"] for line in f)
    held_out = [p for p in stdlib_files() if os.path.relpath(p, root) not in seen]
    rnd = random.Random(seed)
    rnd.shuffle(held_out)
    windows, files = [], []
    for path in held_out:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        lines = text.splitlines(keepends=True)
        if len(lines) < 40:
            continue
        start = rnd.randrange(len(lines) // 2)
        ids = [int(i) for i in tokenizer.encode_batch(["".join(lines[start:])])[0]]
        if len(ids) < need:
            continue
        windows.append(ids[:need])
        files.append(f"{os.path.relpath(path, root)}:{start + 1}")
        if len(windows) == count:
            break
    return [w[:length] for w in windows], windows, files


def head_accuracy(model, windows: list[list[int]], vocab_size: int) -> list[float]:
    """Each head's teacher-forced top-1 accuracy on the held-out windows."""
    import torch

    from mtp_dist.inference.decode import vocab_parallel_argmax

    n = model.n_future_tokens
    correct, total = [0] * n, [0] * n
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([w])
            for i, logits in enumerate(model.head_logits(ids)):
                guess = vocab_parallel_argmax(logits[:, 0], vocab_size)
                hits = guess[: len(w) - 1 - i] == ids[0, 1 + i :]
                correct[i] += int(hits.sum())
                total[i] += hits.numel()
    return [c / t for c, t in zip(correct, total, strict=True)]


def matmul_microseconds(hidden: int, ffn: int, rows=(1, 2, 3, 4)) -> dict[int, float]:
    """CPU time of one [rows, hidden] x [hidden, 2*ffn] matmul (a SwiGLU fc1), per row count:
    on a CPU a verifying forward's few tokens cost more than one token's matrix-vector product,
    which a GPU hides."""
    import torch

    weight = torch.randn(2 * ffn, hidden)
    out = {}
    for m in rows:
        x = torch.randn(m, 1, hidden)
        for _ in range(50):
            torch.matmul(x, weight.t())
        c0 = time.process_time()
        for _ in range(2000):
            torch.matmul(x, weight.t())
        out[m] = (time.process_time() - c0) / 2000 * 1e6
    return out


def decode_all(decoder, prompts, new_tokens: int, k: int, batch: int):
    """All prompts' results, the wall-clock and this process's CPU seconds."""
    results, t0, c0 = [], time.perf_counter(), time.process_time()
    for first in range(0, len(prompts), batch):
        results += decoder.generate(prompts[first : first + batch], new_tokens, k=k)
    return results, time.perf_counter() - t0, time.process_time() - c0


UNPACKED = 0
"""The method key of greedy decoding with megatron-core's own matmuls (no packed weights)."""


def measure(decoders, prompts, new_tokens: int, ks, batch: int, repeats: int) -> list[dict]:
    """decoders: with and without packed weights; ks: the methods (UNPACKED: greedy without)."""
    best = {k: float("inf") for k in ks}
    best_cpu = dict(best)
    outputs = {}
    for _ in range(repeats):
        for k in ks:
            decoder = decoders[k == UNPACKED]
            results, seconds, cpu = decode_all(decoder, prompts, new_tokens, max(k, 1), batch)
            best[k] = min(best[k], seconds)
            best_cpu[k] = min(best_cpu[k], cpu)
            outputs[k] = results
    greedy = outputs[1]
    rows = []
    for k in ks:
        results = outputs[k]
        if [r.tokens for r in results] != [r.tokens for r in greedy]:
            raise AssertionError(f"k={k}: the tokens differ from greedy decoding's")
        tokens = sum(len(r.tokens) for r in results)
        forwards = sum(r.forwards for r in results)
        verifications = sum(r.verifications for r in results)
        accepted = [sum(r.drafts_accepted[j] for r in results) for j in range(k - 1)]
        speedup = best[1] / best[k]
        tpf = tokens / forwards
        rows.append({
            "k": max(k, 1),
            "packed_weights": k != UNPACKED,
            "batch": batch,
            "seconds": best[k],
            "tokens": tokens,
            "tokens_per_s": tokens / best[k],
            "forwards": forwards,
            "tokens_per_forward": tpf,
            "acceptance": [a / max(1, verifications) for a in accepted],
            "speedup": speedup,
            "cpu_seconds": best_cpu[k],
            "speedup_cpu_time": best_cpu[1] / best_cpu[k],
            "speedup_per_tokens_per_forward": speedup / tpf,
            "paper_speedup": PAPER_TABLE_S2_CODE.get(k, (1.0, 1.0))[0],
            "paper_tokens_per_forward": PAPER_TABLE_S2_CODE.get(k, (1.0, 1.0))[1],
            "identical_to_greedy": True,
        })  # fmt: skip
    return rows


def forward_cost_by_depth(cfg, depths, ks, prompt_tokens: int, forwards: int, repeats: int):
    """A verifying forward's wall time over a greedy one's, for untrained models of this width
    and trunk depths `depths` (the cost does not depend on the weights: untrained drafts are
    rejected, so every forward is one verification of k tokens); best of `repeats`."""
    import dataclasses

    from mtp_dist.inference.decode import Decoder
    from mtp_dist.model.model import build_model
    from mtp_dist.model.weights import init_weights

    prompt = [list(range(1, prompt_tokens + 1))]
    out = []
    for depth in depths:
        model = build_model(dataclasses.replace(cfg.model, num_layers=depth))
        init_weights(model, seed=0)
        decoder = Decoder(model, cfg.model.vocab_size)
        decoder.generate(prompt, 4, k=max(ks))  # warm-up
        per_forward = {}
        for k in [1, *ks]:
            best = float("inf")
            for _ in range(repeats):
                r = decoder.generate(prompt, forwards, k=k)[0]
                best = min(best, r.seconds / r.forwards)
            per_forward[k] = best
        for k in ks:
            out.append({
                "trunk_layers": depth,
                "k": k,
                "greedy_forward_ms": per_forward[1] * 1e3,
                "verifying_forward_ms": per_forward[k] * 1e3,
                "cost_ratio": per_forward[k] / per_forward[1],
                "layer_ratio": 1 / layer_bound(depth, k),
            })  # fmt: skip
    return out


def print_depth_table(rows: list[dict]) -> None:
    print(
        "| trunk layers | k | greedy forward ms | verifying forward ms | verifying / greedy "
        "| layers (L + k) / (L + 1) |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['trunk_layers']} | {r['k']} | {r['greedy_forward_ms']:.2f} "
            f"| {r['verifying_forward_ms']:.2f} | {r['cost_ratio']:.2f} | {r['layer_ratio']:.2f} |"
        )


def layer_bound(trunk_layers: int, k: int) -> float:
    """A greedy forward's layers over a verifying forward's: (L + 1) / (L + k)."""
    return (trunk_layers + 1) / (trunk_layers + k)


def print_table(rows: list[dict], trunk_layers: int) -> None:
    print(
        "| batch | method | tokens/s | speedup | (CPU time) | tokens/forward "
        "| speedup / (tokens/forward) | layer-count bound | of the bound "
        "| acceptance heads 2..k | paper speedup | paper tokens/forward |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        acc = " / ".join(f"{a:.2f}" for a in r["acceptance"]) or "-"
        bound = layer_bound(trunk_layers, r["k"])
        method = f"k={r['k']}" if r["k"] > 1 else "greedy"
        if not r["packed_weights"]:
            method += ", megatron-core matmuls"
        paper = ("-", "-")
        if r["k"] > 1:
            paper = (f"{r['paper_speedup']:.2f}", f"{r['paper_tokens_per_forward']:.2f}")
        print(
            f"| {r['batch']} | {method} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f} "
            f"| {r['speedup_cpu_time']:.2f} "
            f"| {r['tokens_per_forward']:.2f} | {r['speedup_per_tokens_per_forward']:.2f} "
            f"| {bound:.2f} | {r['speedup_per_tokens_per_forward'] / bound:.2f} | {acc} "
            f"| {paper[0]} | {paper[1]} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("runs/speculative"))
    p.add_argument("--steps", type=int, default=600, help="training steps of the n=4 model")
    p.add_argument("--nproc", type=int, default=2, help="training processes")
    p.add_argument(
        "--reuse", action="store_true", help="decode with the run's latest checkpoint, no training"
    )
    p.add_argument("--prompts", type=int, default=12)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, nargs="*", default=[1, 4], help="batch sizes")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads while decoding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--depths",
        type=int,
        nargs="*",
        default=[4, 12, 28],
        help="trunk depths of the forward-cost table (28: the paper's 7B model, 32 - 4 heads)",
    )
    p.add_argument("--out", type=Path, default=RESULT)
    args = p.parse_args()

    command = train(args.workdir, args.steps, args.nproc, args.reuse)

    import torch

    from mtp_dist import distributed, sources
    from mtp_dist.compat import ignore_known_warnings
    from mtp_dist.files import atomic_write
    from mtp_dist.inference.decode import Decoder
    from mtp_dist.model.model import build_model

    ignore_known_warnings()
    torch.set_num_threads(args.threads)
    source = sources.open_source(args.workdir / "run")
    training = training_summary(args.workdir / "run", source.step, command)
    cfg = source.config
    tokenizer = sources.load_tokenizer(source)
    need = args.prompt_tokens + args.new_tokens
    if need > cfg.model.seq_length:
        raise SystemExit(f"--prompt-tokens + --new-tokens must be <= {cfg.model.seq_length}")
    prompts, windows, files = held_out_prompts(
        args.workdir, tokenizer, args.prompts, args.prompt_tokens, need, args.seed
    )
    dims = distributed.init(1, 1, seed=0)
    try:
        model = build_model(cfg.model, device=dims.device)
        source.load_into(model)
        model.eval()
        accuracy = head_accuracy(model, windows, cfg.model.vocab_size)
        matmul = matmul_microseconds(cfg.model.hidden_size, cfg.model.ffn_size)
        vocab = cfg.model.vocab_size
        decoders = [Decoder(model, vocab), Decoder(model, vocab, packed_weights=False)]
        for decoder in decoders:
            decoder.generate(prompts[:1], 8, k=4)  # warm-up
        ks = [UNPACKED, 1, 2, 3, 4]
        rows = [r for b in args.batch for r in measure(decoders, prompts, args.new_tokens, ks, b,
                                                        args.repeats)]  # fmt: skip
        depth = forward_cost_by_depth(cfg, args.depths, [2, 3, 4], args.prompt_tokens,
                                      args.new_tokens // 2, args.repeats)  # fmt: skip
    finally:
        distributed.destroy()

    m = cfg.model
    print(
        f"n=4 model: {m.num_layers} trunk layers + 4 heads, hidden {m.hidden_size}, vocab "
        f"{m.vocab_size}, trained {training['steps']} steps in "
        f"{training['train_seconds'] / 60:.1f} min ({training['tokens_per_s']:.0f} tokens/s)"
    )
    print("held-out top-1 accuracy per head: " + " / ".join(f"{a:.3f}" for a in accuracy))
    print(
        "one fc1 matmul by tokens in the forward: "
        + ", ".join(f"{m}: {us:.0f} us" for m, us in matmul.items())
    )
    print(
        f"{len(prompts)} held-out prompts of {args.prompt_tokens} tokens, {args.new_tokens} new "
        f"tokens each, fp32, CPU, {args.threads} thread(s), best of {args.repeats}"
    )
    print_table(rows, m.num_layers)
    print(
        f"\nThe cost of a forward by trunk depth (untrained models of this width, batch 1, "
        f"{args.prompt_tokens}-token prompt, {args.new_tokens // 2} forwards, best of "
        f"{args.repeats}):"
    )
    print_depth_table(depth)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "model": {
            "source": str(source.path),
            **{
                k: getattr(m, k)
                for k in (
                    "n_future_tokens",
                    "num_layers",
                    "hidden_size",
                    "num_attention_heads",
                    "vocab_size",
                    "seq_length",
                )
            },
        },  # fmt: skip
        "training": training,
        "held_out_head_accuracy": accuracy,
        "fc1_matmul_microseconds_by_tokens": matmul,
        "prompts": files,
        "settings": {
            k: getattr(args, k)
            for k in ("prompts", "prompt_tokens", "new_tokens", "repeats", "threads", "seed")
        },  # fmt: skip
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
        },  # fmt: skip
        "rows": rows,
        "forward_cost_by_depth": depth,
    }
    atomic_write(args.out, json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
