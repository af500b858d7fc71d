"""`python -m mtp_dist.generate CHECKPOINT_OR_EXPORT --prompt TEXT`: continuations from a trained
model, greedy or sampled (--temperature > 0, --top-k, --top-p, --seed, --num-samples), optionally
with self-speculative decoding over its extra heads (--speculative K: heads 2..K draft, head 1
verifies; the output is greedy decoding's token for token, or follows the sampling distribution
exactly).

Prints each prompt's text and continuation, then a stats line (tokens/s, forwards, tokens per
forward, each drafting head's acceptance rate); --json prints one JSON object per prompt instead.
Runs on CPU or GPU; under torchrun the model is split over the ranks by tensor parallelism.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mtp_dist.errors import UserError, run_cli
from mtp_dist.files import read_utf8


def read_prompts(texts: list[str], files: list[Path]) -> list[str]:
    """--prompt texts, then each --prompt-file: a `.jsonl` file holds one prompt per line (a JSON
    string, or an object with a "prompt" or "text" field); any other file is one prompt. All
    must be UTF-8 text."""
    prompts = [_utf8(text, f"--prompt {i}") for i, text in enumerate(texts, 1)]
    for path in files:
        data = read_utf8(path, "a prompt file")
        if path.suffix != ".jsonl":
            prompts.append(data)
            continue
        for number, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{number} is not JSON ({e.msg}): fix the line") from e
            if isinstance(item, dict):
                item = item.get("prompt", item.get("text"))
            if not isinstance(item, str):
                raise UserError(
                    f'{path}:{number}: a line must be a JSON string or hold a "prompt" string'
                )
            prompts.append(_utf8(item, f"{path}:{number}"))
    if not prompts:
        raise UserError("no prompt given: use --prompt TEXT or --prompt-file FILE")
    return prompts


def _utf8(text: str, where: str) -> str:
    """A prompt that is Unicode text: Python keeps an argument's invalid UTF-8 bytes as lone
    surrogates (and JSON's \\ud800 escapes make them too), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(
            f"{where} is not valid UTF-8 text (at character {e.start}): give the prompt as UTF-8"
        ) from e
    return text


def check_speculative(k: int | None, n: int, where: Path) -> int:
    """The number of heads decoding uses (1: greedy)."""
    if k is None:
        return 1
    if n == 1:
        raise UserError(
            f"--speculative {k} needs a model with extra heads to draft with, but {where} has "
            "model.n_future_tokens=1: decode without --speculative"
        )
    if not 2 <= k <= n:
        raise UserError(
            f"--speculative {k} is out of range: {where} has {n} heads "
            f"(model.n_future_tokens={n}), so K must be in 2..{n}"
        )
    return k


def encode_prompts(tokenizer, prompts: list[str], source) -> list[list[int]]:
    """Token ids of each prompt, after an end-of-document token: a prompt starts a document as
    one does in training, where every document follows the previous one's end token. Each
    leaves room in the model's context for at least one new token."""
    from mtp_dist.sources import check_context

    encoded = [[tokenizer.eod_id, *map(int, ids)] for ids in tokenizer.encode_batch(prompts)]
    for i, ids in enumerate(encoded, 1):
        check_context(
            source,
            len(ids) + 1,
            f"prompt {i} with the start-of-document token and one new token",
            f"shorten it to at most {source.context - 2} tokens",
        )
    return encoded


def add_sampling_arguments(p, temperature_help: str = "") -> None:
    """--temperature, --top-k, --top-p and --seed, as check_sampling reads them (generate's
    and the evaluate commands')."""
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help=temperature_help
        or "0 (default): greedy; > 0: sample from the softmax of logits / temperature",
    )
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest (0: all)")
    p.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="sample from the likeliest tokens that hold probability top-p (1: all)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="with the prompt and the sample index, fixes a sequence's samples (not --batch)",
    )


def check_sampling(args):
    """The sampling settings of the command line (temperature 0: greedy), each bad value
    refused with the flag's name."""
    from mtp_dist.inference.sampling import Sampling

    if not args.temperature >= 0:
        raise UserError(f"--temperature {args.temperature}: give 0 (greedy) or more")
    if args.top_k < 0:
        raise UserError(f"--top-k {args.top_k}: give 0 (all tokens) or more")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p {args.top_p}: give a value in (0, 1] (1: all tokens)")
    if args.num_samples < 1:
        raise UserError(f"--num-samples {args.num_samples}: give at least 1")
    return Sampling(args.temperature, args.top_k, args.top_p, args.seed)


def stats(result, k: int) -> dict:
    return {
        "new_tokens": len(result.tokens),
        "forwards": result.forwards,
        "tokens_per_forward": round(result.tokens_per_forward, 4),
        "acceptance": {str(i + 2): round(a, 4) for i, a in enumerate(result.acceptance)},
        "seconds": round(result.seconds, 4),
        "tokens_per_second": round(len(result.tokens) / max(result.seconds, 1e-9), 2),
        "speculative": k,
    }


def stats_line(s: dict) -> str:
    acceptance = " ".join(f"head{h} {a:.2f}" for h, a in s["acceptance"].items())
    return (
        f"[{s['new_tokens']} tokens, {s['seconds']:.2f} s, {s['tokens_per_second']:.1f} tokens/s, "
        f"{s['forwards']} forwards, {s['tokens_per_forward']:.2f} tokens/forward"
        + (f", acceptance {acceptance}" if acceptance else "")
        + "]"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mtp_dist.generate", description=__doc__)
    p.add_argument(
        "source",
        type=Path,
        help="a checkpoint (step_* directory, checkpoints directory or run directory: their "
        "latest), a file written by `python -m mtp_dist.export`, or a Hugging Face Llama "
        "directory (`export --format hf`: its extra heads too)",
    )
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument(
        "--prompt-file",
        action="append",
        default=[],
        type=Path,
        help="a file that is one prompt, or a .jsonl file of prompts (repeatable)",
    )
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument(
        "--speculative",
        type=int,
        metavar="K",
        help="self-speculative decoding with heads 1..K (2 <= K <= n): greedy's tokens, or the "
        "sampling distribution, with fewer forwards",
    )
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    add_sampling_arguments(p)
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt (default 1)")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    p.add_argument("--tokenizer", help="instead of the tokenizer recorded with the model")
    p.add_argument("--no-eos", action="store_true", help="do not stop at the end-of-document token")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="also show upstream packages' warnings (or set MTP_DIST_VERBOSE=1)",
    )
    # Parsed inside run_cli: --help into a closed pipe ends as quietly as any output.
    return run_cli(lambda: _main(p.parse_args(argv)))


def _main(args) -> int:
    from mtp_dist.compat import quiet_upstream_warnings

    quiet_upstream_warnings(args.verbose)  # before megatron-core is imported: it warns then
    from mtp_dist import distributed, sources

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: give at least 1")
    if args.batch < 1:
        raise UserError(f"--batch {args.batch}: give at least 1")
    sampling = check_sampling(args)
    # The launcher's world (torchrun's ranks), checked: not a stale WORLD_SIZE alone.
    tensor = distributed.read_launch_env().world_size
    texts = read_prompts(args.prompt, args.prompt_file)
    source = sources.open_source(args.source)
    cfg = source.config_at(tensor)
    k = check_speculative(args.speculative, cfg.model.n_future_tokens, source.path)
    tokenizer = sources.load_tokenizer(source, args.tokenizer)
    prompts = encode_prompts(tokenizer, texts, source)

    from mtp_dist.inference.decode import Decoder
    from mtp_dist.model.model import build_model

    dims = distributed.init(tensor, 1, seed=cfg.train.seed)
    try:
        model = build_model(cfg.model, tensor=dims.tp, device=dims.device)
        source.load_into(model)
        decoder = Decoder(model.eval(), cfg.model.vocab_size)
        eos = None if args.no_eos else tokenizer.eod_id
        # Every prompt's samples in turn, batched together: (prompt, sample index) pairs.
        pairs = [(i, s) for i in range(len(prompts)) for s in range(args.num_samples)]
        results = []
        for first in range(0, len(pairs), args.batch):
            batch = pairs[first : first + args.batch]
            results += decoder.generate(
                [prompts[i] for i, _ in batch], args.max_new_tokens, k=k, eos_id=eos,
                sampling=sampling, samples=[s for _, s in batch],
            )  # fmt: skip
        seconds = sum(r.seconds for r in results[:: args.batch])
    finally:
        distributed.destroy()
    if dims.rank == 0:
        texts = [t for t in texts for _ in range(args.num_samples)]
        prompts = [p for p in prompts for _ in range(args.num_samples)]
        _print(texts, prompts, results, tokenizer, k, seconds, args.json, args.num_samples)
    return 0


def _print(
    texts, prompts, results, tokenizer, k: int, seconds: float, as_json: bool, samples: int = 1
) -> None:
    for n, (text, ids, result) in enumerate(zip(texts, prompts, results, strict=True)):
        # Decoded with the prompt, then cut: a tokenizer may join pieces across the boundary.
        prefix = tokenizer.decode(ids)
        completion = tokenizer.decode(ids + result.tokens)[len(prefix) :]
        s = stats(result, k)
        if as_json:
            record = {
                "prompt": text,
                "sample": n % samples,
                "completion": completion,
                "tokens": result.tokens,
                "finish_reason": result.finish_reason,
                "stats": s,
            }
            print(json.dumps(record), flush=True)
        else:
            print(text + completion)
            print(stats_line(s), flush=True)
    if len(results) > 1 and not as_json:
        tokens = sum(len(r.tokens) for r in results)
        forwards = sum(r.forwards for r in results)
        print(
            f"[all {len(results)} prompts: {tokens} tokens, {seconds:.2f} s, "
            f"{tokens / max(seconds, 1e-9):.1f} tokens/s, {tokens / max(1, forwards):.2f} "
            "tokens/forward]"
        )


if __name__ == "__main__":
    sys.exit(main())
