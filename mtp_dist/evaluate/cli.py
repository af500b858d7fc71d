"""`python -m mtp_dist.evaluate humaneval SOURCE`: HumanEval pass@k of a trained model;
`python -m mtp_dist.evaluate heads SOURCE --data DIR`: each head's loss, top-1 accuracy and
teacher-forced self-speculative acceptance on held-out shards (evaluate/heads.py);
`python -m mtp_dist.evaluate induction SOURCE... --data DIR --names FILE`: induction success and
head 1's loss on the induction task's held-out shards (evaluate/induction.py).

Each problem's prompt as is (after an end-of-document token, as `generate` starts a document),
--num-samples continuations per problem (greedy at --temperature 0, the default; sampled
otherwise, optionally self-speculatively), each cut at the usual stop sequences and run against
the problem's tests in its own process; pass@k by the unbiased estimator for each --k. Prints a
table; --output DIR keeps samples.jsonl, run.json and summary.json, and a rerun continues there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import Counter
from pathlib import Path

from mtp_dist.errors import UserError, run_cli


def parse_ks(text: str, num_samples: int) -> list[int]:
    try:
        ks = sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError as e:
        raise UserError(f"--k {text}: give comma-separated integers, e.g. 1,10,100") from e
    if not ks or ks[0] < 1:
        raise UserError(f"--k {text}: give values of at least 1")
    if ks[-1] > num_samples:
        raise UserError(
            f"--k {text}: pass@{ks[-1]} needs at least {ks[-1]} samples per problem, but "
            f"--num-samples is {num_samples}: raise --num-samples or lower --k"
        )
    return ks


def summarise(problems, done: dict, ks: list[int], header: dict) -> dict:
    from mtp_dist.evaluate.passk import mean_pass_at_k

    n = header["settings"]["num_samples"]
    records = [done[(p.task_id, s)] for p in problems for s in range(n)]
    counts = [(n, sum(done[(p.task_id, s)]["passed"] for s in range(n))) for p in problems]
    tokens = sum(r["new_tokens"] for r in records)
    forwards = sum(r["forwards"] for r in records)
    verifications = sum(r["verifications"] for r in records)
    heads = len(records[0]["drafts_accepted"]) if records else 0
    accepted = [sum(r["drafts_accepted"][j] for r in records) for j in range(heads)]
    errors = Counter(r["error"] for r in records if r["error"])  # the most frequent first
    return {
        **{f"pass@{k}": round(mean_pass_at_k(counts, k), 6) for k in ks},
        "problems": len(problems),
        "samples_per_problem": n,
        "errors": dict(sorted(errors.items(), key=lambda e: (-e[1], e[0]))),
        "tokens_per_forward": round(tokens / max(1, forwards), 4),
        "acceptance": {
            str(j + 2): round(a / max(1, verifications), 4) for j, a in enumerate(accepted)
        },
        **header,
    }


def table(summary: dict, ks: list[int]) -> str:
    s = summary["settings"]
    lines = [
        f"HumanEval: {summary['problems']} problems, {summary['samples_per_problem']} samples "
        f"each (temperature {s['temperature']}, top-k {s['top_k']}, top-p {s['top_p']}, "
        f"speculative K={s['speculative']})"
    ]
    lines += [f"  pass@{k:<4d} {summary[f'pass@{k}']:.4f}" for k in ks]
    errors = ", ".join(f"{e} {c}" for e, c in summary["errors"].items()) or "none"
    lines.append(f"  failures: {errors}")
    line = f"  tokens/forward {summary['tokens_per_forward']:.2f}"
    if summary["acceptance"]:
        line += ", acceptance " + " ".join(
            f"head{h} {a:.2f}" for h, a in summary["acceptance"].items()
        )
    lines.append(line)
    return "\n".join(lines)


def humaneval(args) -> int:
    from tqdm import tqdm

    from mtp_dist.evaluate.humaneval import read_problems
    from mtp_dist.evaluate.model import Model, settings_of
    from mtp_dist.evaluate.results import RunDir
    from mtp_dist.generate import check_sampling

    sampling = check_sampling(args)
    n = args.num_samples
    if n > 1 and sampling.greedy:
        raise UserError(
            f"--num-samples {n} at temperature 0 gives {n} identical greedy samples: give "
            "--temperature > 0 (e.g. 0.2 for pass@1, 0.8 for pass@100)"
        )
    ks = parse_ks(args.k or ",".join(str(k) for k in (1, 10, 100) if k <= n), n)
    for flag, value in (("--limit", args.limit), ("--batch", args.batch)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: give at least 1")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: give at least 1")
    problems = read_problems(args.problems)
    # The whole problem set identifies the run, --limit does not: a rerun may take more.
    problem_set = json.dumps([[p.task_id, p.prompt, p.test] for p in problems]).encode()
    problems = problems[: args.limit]
    model = Model(args.source, args.tokenizer, args.speculative, args.tensor)
    header = {
        "model": model.identity,
        "settings": settings_of(
            sampling,
            num_samples=n,
            max_new_tokens=args.max_new_tokens,
            speculative=model.k,
            timeout=args.timeout,
        ),  # fmt: skip
        "problems_sha256": hashlib.sha256(problem_set).hexdigest(),
    }
    writer = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 writes
    run = RunDir(args.output, header, writer) if args.output else None
    try:
        done = run.open() if run else {}
        encoded = model.encode([p.prompt for p in problems])
        pending = [(i, s) for i, p in enumerate(problems) for s in range(n)]
        pending = [(i, s) for i, s in pending if (problems[i].task_id, s) not in done]
        if pending:
            with model, tqdm(
                total=len(problems) * n, initial=len(problems) * n - len(pending),
                unit="sample", disable=not writer, file=sys.stderr, dynamic_ncols=True,
            ) as bar:  # fmt: skip
                # Shared out over the data-parallel groups; every rank takes the same number of
                # steps (an empty batch at the end, where its share is short) to gather results.
                rank, groups = model.share
                share = pending[rank::groups]
                per_group = -(-len(pending) // groups)
                for step in range(-(-per_group // args.batch)):
                    batch = share[step * args.batch : (step + 1) * args.batch]
                    records = []
                    if batch:
                        records = _sample_and_check(model, problems, encoded, batch, sampling, args)
                    records = model.gather(records)
                    if writer:
                        if run:
                            run.append(records)
                        done.update({(r["task_id"], r["sample"]): r for r in records})
                        bar.update(len(records))
        if not writer:
            return 0
        summary = summarise(problems, done, ks, header)
        if run:
            run.write_summary(summary)
    finally:
        if run:
            run.close()
    print(table(summary, ks))
    if args.json:
        print(json.dumps(summary))
    return 0


def _sample_and_check(model, problems, encoded, batch, sampling, args) -> list[dict]:
    """One batch of (problem index, sample index): generated, cut, run against the tests (by
    the first rank of the TP group; the others only take part in generation). Its records."""
    from mtp_dist.evaluate.execution import check_completions
    from mtp_dist.evaluate.humaneval import cut_completion

    prompts, samples = [encoded[i] for i, _ in batch], [s for _, s in batch]
    texts, results = model.continuations(prompts, samples, args.max_new_tokens, sampling)
    if not model.checks:
        return []
    completions = [cut_completion(t) for t in texts]
    items = [(problems[i], c) for (i, _), c in zip(batch, completions, strict=True)]
    outcomes = check_completions(items, args.timeout, args.workers)
    return [
        {
            "task_id": problems[i].task_id, "sample": s, "completion": c,
            "passed": o.passed, "error": o.error, "new_tokens": len(r.tokens),
            "finish_reason": r.finish_reason, "forwards": r.forwards,
            "drafts_accepted": r.drafts_accepted, "verifications": r.verifications,
        }
        for (i, s), c, o, r in zip(batch, completions, outcomes, results, strict=True)
    ]  # fmt: skip


def heads(args) -> int:
    """Each head's loss, top-1 accuracy and teacher-forced acceptance on held-out windows
    (evaluate/heads.py defines every number)."""
    import torch

    from mtp_dist.evaluate.heads import (
        Tally,
        held_out_windows,
        table,
        tally_greedy_acceptance,
        tally_sampled_acceptance,
        tally_windows,
    )
    from mtp_dist.evaluate.model import Model
    from mtp_dist.generate import check_sampling

    for flag, value in (("--max-windows", args.max_windows), ("--batch", args.batch)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: give at least 1")
    sampling = check_sampling(args)
    prompt = args.prompt
    if not sampling.greedy and prompt is None:
        raise UserError(
            f"--temperature {args.temperature} needs --prompt P: the acceptance of speculative "
            "sampling is measured on the model's own sampled continuations of P-token prompts"
        )
    model = Model(args.source, args.tokenizer, None)
    n, s = model.cfg.model.n_future_tokens, model.cfg.model.seq_length
    if prompt is not None and not 1 <= prompt <= s - n:
        raise UserError(
            f"--prompt {prompt}: give 1..{s - n} (model.seq_length - n), so that the "
            "continuation has positions whose drafts can be checked"
        )
    windows = held_out_windows(
        args.data, args.split, model.cfg.data.split, model.cfg.model.vocab_size,
        model.tokenizer.identity_hash, s + n,
    )  # fmt: skip
    batch, tally = [], Tally(n)
    first = next(windows, None)  # the data's errors before the model is loaded
    if first is None:
        raise UserError(
            f"--data {args.data} ({args.split}) holds fewer than one window of {s + n} tokens "
            "(model.seq_length + n): give more data"
        )

    def add(batch) -> None:
        windows = torch.stack(batch)
        tally_windows(model.network, windows, model.vocab, tally, acceptance=prompt is None)
        if prompt is not None and n > 1 and sampling.greedy:
            decoder = model.decoder
            tally_greedy_acceptance(model.network, decoder, windows, prompt, model.vocab, tally)
        elif prompt is not None and n > 1:
            tally_sampled_acceptance(
                model.network, model.decoder, windows, prompt, model.vocab, tally, sampling
            )

    with model:
        for w in _limited([first], windows, args.max_windows):
            batch.append(torch.from_numpy(w))
            if len(batch) == args.batch:
                add(batch)
                batch = []
        if batch:
            add(batch)
    on = "the data"
    if prompt is not None and sampling.greedy:
        on = f"greedy continuations of {prompt}-token prompts"
    elif prompt is not None:
        on = (
            f"sampled continuations of {prompt}-token prompts (temperature {sampling.temperature}"
            f", top-k {sampling.top_k}, top-p {sampling.top_p}, seed {sampling.seed})"
        )
    summary = {
        **tally.summary(),
        "data": {"path": str(args.data.resolve()), "split": args.split, "acceptance_on": on},
        "model": model.identity,
    }
    print(json.dumps(summary) if args.json else table(summary))
    return 0


def induction(args) -> int:
    """Induction success and head 1's loss of each source on the induction task's held-out
    shards (evaluate/induction.py defines both)."""
    from data_prep.induction import read_names

    for flag, value in (("--max-windows", args.max_windows), ("--batch", args.batch)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: give at least 1")
    info = read_names(str(args.names))  # before the seconds of importing torch and megatron-core
    from mtp_dist.evaluate.heads import held_out_windows
    from mtp_dist.evaluate.induction import Pieces, model_predictor, score_windows, table
    from mtp_dist.evaluate.model import Model

    rows = []
    for source in args.sources:
        model = Model(source, args.tokenizer, None)
        pieces = Pieces.of(model.tokenizer, info)
        s = model.cfg.model.seq_length
        windows = held_out_windows(
            args.data, "all", model.cfg.data.split, model.vocab, model.tokenizer.identity_hash,
            s + 1,
        )  # fmt: skip
        first = next(windows, None)  # the data's errors before the model is loaded
        if first is None:
            raise UserError(
                f"--data {args.data} holds fewer than one window of {s + 1} tokens "
                "(model.seq_length + 1): give more data"
            )
        with model:
            predict = model_predictor(model.network, model.vocab)
            windows = _limited([first], windows, args.max_windows)
            summary = score_windows(windows, predict, pieces, args.batch)
        rows.append({"source": str(source), "step": model.source.step, **summary,
                     "model": model.identity})  # fmt: skip
    print(json.dumps(rows) if args.json else table(rows))
    return 0


def _limited(head: list, rest, limit: int | None):
    import itertools

    return itertools.islice(itertools.chain(head, rest), limit)


def main(argv=None) -> int:
    from mtp_dist.generate import add_sampling_arguments

    p = argparse.ArgumentParser(prog="python -m mtp_dist.evaluate", description=__doc__)
    commands = p.add_subparsers(dest="command", required=True)
    h = commands.add_parser("humaneval", help="HumanEval pass@k", description=__doc__)
    h.add_argument("source", type=Path, help="any model source `generate` reads")
    h.add_argument("--num-samples", type=int, default=1, help="samples per problem (default 1)")
    add_sampling_arguments(h)
    h.add_argument("--k", help="pass@k for these k (default: 1,10,100 up to --num-samples)")
    h.add_argument("--limit", type=int, help="the first N problems only")
    h.add_argument("--batch", type=int, default=16, help="sequences decoded together")
    h.add_argument("--speculative", type=int, metavar="K", help="self-speculative, heads 1..K")
    h.add_argument(
        "--tensor",
        type=int,
        default=1,
        help="under torchrun: tensor-parallel size (default 1); the rest is data-parallel",
    )
    h.add_argument("--max-new-tokens", type=int, default=384)
    h.add_argument("--timeout", type=float, default=5.0, help="seconds per program")
    h.add_argument("--workers", type=int, help="programs run at once (default: the CPUs)")
    h.add_argument("--problems", type=Path, help="a HumanEval-format .jsonl(.gz) instead")
    h.add_argument("--output", type=Path, help="keep samples and summary here; resumable")
    h.add_argument("--tokenizer", help="instead of the tokenizer recorded with the model")
    h.add_argument("--json", action="store_true", help="also print the summary as JSON")
    h.add_argument("--verbose", action="store_true", help="show upstream packages' warnings")
    e = commands.add_parser("heads", help="per-head loss, accuracy, acceptance on held-out data")
    e.description = "Per-head loss, top-1 accuracy and teacher-forced self-speculative acceptance "
    e.description += "on held-out shards (see mtp_dist/evaluate/heads.py for each number)."
    e.add_argument("source", type=Path, help="any model source `generate` reads")
    e.add_argument(
        "--data", type=Path, required=True, help="a directory of shards (`data_prep tokenize`)"
    )
    e.add_argument(
        "--split",
        choices=("all", "valid", "test"),
        default="all",
        help="all (default): every document; valid/test: that part of each shard under the "
        "model's data.split (what training held out)",
    )
    e.add_argument(
        "--max-windows", "--limit", type=int, help="the first N windows only (default: all)"
    )
    e.add_argument("--batch", type=int, default=8, help="windows per forward (default 8)")
    e.add_argument(
        "--prompt",
        "--greedy-prompt",
        type=int,
        metavar="P",
        help="acceptance on the model's own text, as `generate --speculative` meets it: each "
        "window's first P tokens continued (greedily, or sampled at --temperature) to "
        "model.seq_length (default: on the data's tokens, one forward per window)",
    )
    add_sampling_arguments(
        e, "0 (default): greedy decoding's acceptance; > 0: speculative sampling's (needs --prompt)"
    )
    e.set_defaults(num_samples=1)  # for check_sampling: one continuation per prompt
    e.add_argument("--tokenizer", help="instead of the tokenizer recorded with the model")
    e.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    e.add_argument("--verbose", action="store_true", help="show upstream packages' warnings")
    d = commands.add_parser("induction", help="induction success on the induction task")
    d.description = "Induction success (Gloeckle et al. 2024, Section 4.1: head 1's top-1 on the "
    d.description += "second token of names seen earlier in the same function) and head 1's loss "
    d.description += "on the held-out shards of `data_prep induction-corpus`."
    d.add_argument("sources", type=Path, nargs="+", help="model sources, e.g. checkpoints/step_*")
    d.add_argument("--data", type=Path, required=True, help="the held-out split's shards")
    d.add_argument("--names", type=Path, required=True, help="the corpus's names.json")
    d.add_argument("--max-windows", type=int, help="the first N windows only (default: all)")
    d.add_argument("--batch", type=int, default=8, help="windows per forward (default 8)")
    d.add_argument("--tokenizer", help="instead of the tokenizer recorded with the model")
    d.add_argument("--json", action="store_true", help="JSON (one object per source)")
    d.add_argument("--verbose", action="store_true", help="show upstream packages' warnings")
    args = p.parse_args(argv)
    commands_run = {"heads": heads, "humaneval": humaneval, "induction": induction}

    def run() -> int:
        from mtp_dist.compat import quiet_upstream_warnings

        quiet_upstream_warnings(args.verbose)
        return commands_run[args.command](args)

    return run_cli(run)
