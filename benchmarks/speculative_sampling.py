"""Benchmark: self-speculative sampling next to plain sampling, at temperatures 0.2 and 0.8.

Model: the n=4 code model of benchmarks/speculative.py (the demo's pipeline, configs/small.yaml,
--steps 600 in the same --workdir; trained with that script's command if the run is absent).
Prompts: speculative.py's held-out prompts (standard-library files the corpus does not hold),
--prompt-tokens each, --samples samples per prompt (sample indices 0..), --new-tokens new tokens,
batch 1, fp32, 1 thread. Methods, per temperature (and greedy, temperature 0, for reference):
plain sampling (K=1) and self-speculative sampling with heads 1..K for K = 2, 3, 4, with
--top-p; each method's time is the best of --repeats runs, the methods interleaved.

Self-speculative sampling keeps head 1's distribution exactly (tests/test_sampling.py tests it
statistically), so its tokens differ from plain sampling's draw for draw but not in
distribution; the speedup is tokens/s over plain sampling's at the same temperature.

Prediction: `python -m mtp_dist.evaluate heads --prompt P --temperature T` on the same prompts
(evaluate/heads.py: the prompt continued by the model to its context, each draft accepted with
the rule's probability sum_x min(p(x), q(x)), walked as the decoder walks), next to the
acceptance the decoder measured. The prediction walks to the model's context (seq_length - P
positions), the decoder --new-tokens.

    python benchmarks/speculative_sampling.py [--workdir runs/speculative] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from speculative import held_out_prompts, train, training_summary  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "speculative_sampling.json"


def measure(decoder, prompts, samples: int, new_tokens: int, sampling, ks, repeats: int):
    """One row per K: tokens/s (best of `repeats`), tokens per forward, acceptance per head."""
    import time

    pairs = [(p, i) for p in prompts for i in range(samples)]
    best = {k: float("inf") for k in ks}
    outputs = {}
    for _ in range(repeats):
        for k in ks:
            results, start = [], time.perf_counter()
            for prompt, index in pairs:
                results += decoder.generate(
                    [prompt], new_tokens, k=k, sampling=sampling, samples=[index]
                )
            best[k] = min(best[k], time.perf_counter() - start)
            if k in outputs and [r.tokens for r in results] != [r.tokens for r in outputs[k]]:
                raise AssertionError(f"K={k}: a repeat drew other tokens (not reproducible)")
            outputs[k] = results
    rows = []
    for k in ks:
        results = outputs[k]
        tokens = sum(len(r.tokens) for r in results)
        verifications = sum(r.verifications for r in results)
        accepted = [sum(r.drafts_accepted[j] for r in results) for j in range(k - 1)]
        rows.append({
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "k": k,
            "sequences": len(results),
            "tokens": tokens,
            "seconds": best[k],
            "tokens_per_s": tokens / best[k],
            "speedup": best[ks[0]] / best[k],
            "forwards": sum(r.forwards for r in results),
            "tokens_per_forward": tokens / sum(r.forwards for r in results),
            "verifications": verifications,
            "acceptance": [a / max(1, verifications) for a in accepted],
        })  # fmt: skip
    return rows


def predict(model, decoder, windows, prompt: int, vocab: int, sampling) -> dict:
    """evaluate heads' acceptance and tokens per forward on these windows' prompts."""
    import torch

    from mtp_dist.evaluate.heads import Tally, tally_greedy_acceptance, tally_sampled_acceptance

    tally = Tally(model.n_future_tokens)
    windows = torch.tensor(windows)
    if sampling.greedy:
        tally_greedy_acceptance(model, decoder, windows, prompt, vocab, tally)
    else:
        tally_sampled_acceptance(model, decoder, windows, prompt, vocab, tally, sampling)
    summary = tally.summary()
    return {
        "acceptance": [h["acceptance"] for h in summary["heads"][1:]],
        "tokens_per_forward": summary["tokens_per_forward"],
    }


def print_table(rows: list[dict]) -> None:
    print(
        "| temperature | method | tokens/s | speedup | tokens/forward | predicted tokens/forward "
        "| acceptance heads 2..K | predicted acceptance |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        k = r["k"]
        method = "greedy" if r["temperature"] == 0 and k == 1 else "plain sampling"
        if k > 1:
            method = f"self-speculative K={k}"
        measured = " / ".join(f"{a:.2f}" for a in r["acceptance"]) or "-"
        predicted = " / ".join(f"{a:.2f}" for a in r["predicted_acceptance"][: k - 1]) or "-"
        tpf = f"{r['predicted_tokens_per_forward']:.2f}" if k > 1 else "-"
        print(
            f"| {r['temperature']} | {method} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f} "
            f"| {r['tokens_per_forward']:.2f} | {tpf} | {measured} | {predicted} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("runs/speculative"))
    p.add_argument("--steps", type=int, default=600, help="training steps of the n=4 model")
    p.add_argument("--nproc", type=int, default=2, help="training processes")
    p.add_argument("--reuse", action="store_true", help="the run's latest checkpoint as it is")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.2, 0.8])
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--prompts", type=int, default=12)
    p.add_argument("--samples", type=int, default=2, help="samples per prompt")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads while decoding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULT)
    args = p.parse_args()

    command = train(args.workdir, args.steps, args.nproc, args.reuse)

    import torch

    from mtp_dist import distributed, sources
    from mtp_dist.compat import ignore_known_warnings
    from mtp_dist.files import atomic_write
    from mtp_dist.inference.decode import Decoder
    from mtp_dist.inference.sampling import Sampling
    from mtp_dist.model.model import build_model

    ignore_known_warnings()
    torch.set_num_threads(args.threads)
    source = sources.open_source(args.workdir / "run")
    cfg = source.config
    tokenizer = sources.load_tokenizer(source)
    need = args.prompt_tokens + args.new_tokens
    prompts, windows, files = held_out_prompts(
        args.workdir, tokenizer, args.prompts, args.prompt_tokens, need, args.seed
    )
    vocab, n = cfg.model.vocab_size, cfg.model.n_future_tokens
    ks = list(range(1, n + 1))
    rows = []
    dims = distributed.init(1, 1, seed=0)
    try:
        model = build_model(cfg.model, device=dims.device)
        source.load_into(model)
        model.eval()
        decoder = Decoder(model, vocab)
        decoder.generate(prompts[:1], 8, k=n, sampling=Sampling(0.8, seed=1))  # warm-up
        for temperature in [0.0, *args.temperatures]:
            sampling = Sampling(temperature, top_p=args.top_p if temperature else 1.0,
                                seed=args.seed)  # fmt: skip
            found = measure(decoder, prompts, args.samples, args.new_tokens, sampling, ks,
                            args.repeats)  # fmt: skip
            predicted = predict(model, decoder, windows, args.prompt_tokens, vocab, sampling)
            for r in found:
                r["predicted_acceptance"] = predicted["acceptance"]
                r["predicted_tokens_per_forward"] = predicted["tokens_per_forward"].get(
                    str(r["k"]), 1.0
                )
            rows += found
            print(f"temperature {temperature}: done", flush=True)
    finally:
        distributed.destroy()

    training = training_summary(args.workdir / "run", source.step, command)
    m = cfg.model
    print(
        f"n=4 model: {m.num_layers} trunk layers + {n} heads, hidden {m.hidden_size}, vocab "
        f"{vocab}, trained {training['steps']} steps"
    )
    print(
        f"{len(prompts)} held-out prompts of {args.prompt_tokens} tokens x {args.samples} samples, "
        f"{args.new_tokens} new tokens each, top-p {args.top_p} (sampling), fp32, CPU, "
        f"{args.threads} thread(s), batch 1, best of {args.repeats}"
    )
    print_table(rows)
    result = {
        "model": {
            "source": str(source.path),
            "step": source.step,
            "n_future_tokens": n,
            "num_layers": m.num_layers,
            "hidden_size": m.hidden_size,
            "vocab_size": vocab,
        },  # fmt: skip
        "training": training,
        "prompts": files,
        "settings": {
            k: getattr(args, k)
            for k in (
                "prompts",
                "samples",
                "prompt_tokens",
                "new_tokens",
                "top_p",
                "repeats",
                "threads",
                "seed",
            )
        },  # fmt: skip
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "load_average": os.getloadavg(),
        },  # fmt: skip
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
