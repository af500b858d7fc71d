"""Benchmark: induction capability of n=1 and n=2 models of 0.1M-2M non-embedding parameters,
next to the paper's Figure 7 (Gloeckle et al. 2024, Section 4.1 and Appendix J).

Data (`python -m data_prep induction-corpus`): one document per standard-library function, its
local names renamed consistently to random two-piece names (first half from 64 pieces, second
half from 32: chance 1/32); a sentencepiece BPE tokenizer (V=2000) trained with the pieces as
user-defined symbols, so each name is exactly two tokens (checked over the corpus); training
and held-out shards from the normal `tokenize`. Held-out source files are not in training.
--task copy trains and scores on the control instead (`python -m data_prep induction-copy`:
each document a line of 15 random names from 16 + 16 of the pieces, then the same line, so
half of it is predictable by induction alone; chance 1/16), at seq 128 and 32 sequences a step.

Runs (`python -m mtp_dist.train --config configs/induction.yaml`): for each width, n=1 and n=2
parameter-matched as in the paper (num_layers = L - n trunk layers plus n head layers, L=4), each
seed, the same tokens per run; checkpoints at --evals points. Each checkpoint is scored with
`python -m mtp_dist.evaluate induction` on the held-out split's first --max-windows windows:
induction success (head 1's top-1 on the second token of names seen earlier in the same
function), the second measure, first-half success (head 1's top-1 on first halves that a
repeated pair of tokens predicts: a model can copy that half of a name and not the other), and
head 1's loss. --jobs runs go at once (one thread each); a finished run is
skipped on a rerun, so an interrupted grid continues (a run interrupted while training resumes
from its last checkpoint; its JSON gives the cost of all its parts, stopped ones included, from
trained_from_step: 0 unless a part went unrecorded, as after a kill -9). SIGTERM or Ctrl-C to
the script stops the grid cleanly: its trainers save a checkpoint, their cost is recorded, and
it exits 128 + the signal; a rerun continues.
Deleting a run's induction.json rescores it without retraining: its training cost is kept in
train_cost.json, and only the scheduled checkpoints are scored. A failed run stops the grid at
once (the runs in flight are checkpointed and resume on a rerun). The tables end with which of
n=1 and n=2 learned first in each seed pair, and a sign test of the paper's direction.

    python benchmarks/induction.py --quick  # d=32,64 x n=1,2 x 2 seeds, 1.2M tokens: ~8 min
    python benchmarks/induction.py          # d=32,64,128 x n=1,2 x 3 seeds, 6M tokens: ~2 h
    python benchmarks/induction.py --task copy  # d=32,64,128 x n=1,2 x 3 seeds, 600 steps
    python benchmarks/induction.py --widths 128 --tokens 12e6 --evals 12  # where all learn: ~2.2 h

(on 2 idle cores, --jobs 2: the measured tokens per CPU second of each run are in the JSON.)
On one GPU, benchmarks/gpu/induction_grid.py runs these runs all at once under a deadline.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FULL = {"widths": "32,64,128", "seeds": 3, "tokens": 6_000_000, "evals": 6}
QUICK = {"widths": "32,64", "seeds": 2, "tokens": 1_200_000, "evals": 3}
# The copy control (--task copy): every document a line of names and the line again.
COPY = {"widths": "32,64,128", "seeds": 3, "tokens": 2_457_600, "evals": 6, "seq": 128,
        "batch": 32}  # fmt: skip
PAPER = (
    "Figure 7: on children's stories with random two-token names, n=2 models of 1M-10M "
    "non-embedding parameters reach clearly higher induction success than n=1 models of the "
    "same size; the advantage fades with size and is gone at about 100M (1B is the largest)."
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="induction.py", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"the small grid: {QUICK}")
    p.add_argument("--task", choices=("code", "copy"), default="code",
                   help="code: the induction task; copy: its control (data_prep induction-copy),"
                   f" by default {COPY}")  # fmt: skip
    p.add_argument(
        "--scaled-init",
        action="store_true",
        help="megatron-core's scaled output init instead of configs/induction.yaml's",
    )
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "induction")
    p.add_argument("--widths", help=f"hidden sizes (default {FULL['widths']})")
    p.add_argument("--ns", default="1,2", help="n_future_tokens values (default 1,2)")
    p.add_argument("--layers", type=int, default=4, help="L: trunk + head layers (default 4)")
    p.add_argument("--seeds", type=int, help=f"seeds per cell (default {FULL['seeds']})")
    p.add_argument("--tokens", type=float, help=f"tokens per run (default {FULL['tokens']:,})")
    p.add_argument("--evals", type=int, help=f"checkpoints scored per run ({FULL['evals']})")
    p.add_argument("--seq", type=int, help="sequence length (default 256; copy 128)")
    p.add_argument("--batch", type=int, help="sequences per step (default 16; copy 32)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--corpus-mb", type=float, default=24.0, help="training source files (MB)")
    p.add_argument("--copy-docs", type=int, default=40_000, help="copy control: training documents")
    p.add_argument("--max-windows", type=int, default=200, help="held-out windows scored")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    p.add_argument("--out", type=Path, help="JSON (default benchmarks/results/induction.json)")
    a = p.parse_args(argv)
    grid = COPY if a.task == "copy" else QUICK if a.quick else FULL
    custom = any(v is not None for v in (a.widths, a.seeds, a.tokens, a.evals, a.seq, a.batch))
    custom = custom or a.ns != "1,2" or a.scaled_init
    name = "copy" if a.task == "copy" else "quick" if a.quick else "full"
    a.grid = name + (" (customised)" if custom else "")
    a.seq = a.seq or grid.get("seq", 256)
    a.batch = a.batch or grid.get("batch", 16)
    try:
        a.widths = [int(w) for w in (a.widths or grid["widths"]).split(",")]
        a.ns = [int(n) for n in a.ns.split(",")]
    except ValueError:
        _usage("--widths and --ns take comma-separated integers, e.g. --widths 32,64")
    a.seeds = grid["seeds"] if a.seeds is None else a.seeds
    a.tokens = int(grid["tokens"] if a.tokens is None else a.tokens)
    a.evals = grid["evals"] if a.evals is None else a.evals
    default_out = {"copy": "induction_copy", "quick": "induction_quick", "full": "induction"}
    a.out = a.out or RESULTS / f"{default_out[name]}.json"
    for ok, problem in (
        (all(n >= 1 and a.layers - n >= 1 for n in a.ns), "--ns: each n in 1..--layers - 1"),
        (all(w >= 32 and w % 32 == 0 for w in a.widths), "--widths: multiples of 32"),
        (a.seeds >= 1 and a.jobs >= 1 and a.evals >= 1, "--seeds, --jobs, --evals: at least 1"),
        (a.tokens >= a.seq * a.batch * a.evals, "--tokens: at least one step per evaluation"),
    ):
        if not ok:
            _usage(problem)
    return a


def _usage(problem: str) -> None:
    print(f"error: {problem} (see --help)", file=sys.stderr)
    sys.exit(2)


# The commands the grid's threads are running now, so that a failure can stop the others.
_RUNNING: set[subprocess.Popen] = set()
_RUNNING_LOCK = threading.Lock()
_STOPPING = threading.Event()  # set when one failed: start no more


def _run(cmd: list[str], log: Path, stdout: Path | None = None, spent: Path | None = None) -> float:
    """Run a command, its output to `log` (its stdout alone to `stdout` if given); a failure
    stops the benchmark. Returns the CPU seconds it used (its own rusage, not its wall time:
    the machine may be shared). With `spent`, its CPU and wall seconds are added to that JSON
    whether it succeeds or not, so a run stopped and resumed keeps the cost of every part."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    if _STOPPING.is_set():
        raise SystemExit("error: not started: the grid is stopping")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as err, open(stdout or os.devnull, "w") as out:
        with _RUNNING_LOCK:
            if _STOPPING.is_set():
                raise SystemExit("error: not started: the grid is stopping")
            if spent is not None:  # open until its seconds are added: a kill -9 leaves it open
                _mark_running(spent)
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=out if stdout else err, stderr=err
            )
            _RUNNING.add(proc)
        try:
            _, status, usage = _wait(proc)
        finally:
            with _RUNNING_LOCK:
                _RUNNING.discard(proc)
        proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    if spent is not None:
        _add_spent(spent, cpu, time.time() - t0)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"error: {' '.join(cmd)} failed ({proc.returncode}); {log}:\n{tail}")
    return cpu


def _wait(proc: subprocess.Popen):
    """os.wait4 for the command. A stop signal that reaches the main thread while it waits
    (the data preparation runs there) stops the command too, so nothing is left behind."""
    try:
        return os.wait4(proc.pid, 0)
    except BaseException:
        proc.terminate()
        os.wait4(proc.pid, 0)
        raise


class GridStopped(Exception):
    """SIGTERM or SIGINT reached the grid script: it stops its commands, waits for them (a
    trainer saves a checkpoint), records their cost, then exits 128 + the signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _on_stop_signal(signum, _frame) -> None:
    """The grid's SIGTERM and SIGINT handler: the first stops the grid (GridStopped, raised in
    the main thread); a later one only says it is stopping already."""
    if _STOPPING.is_set():  # stopping already: let the commands in flight finish saving
        print(
            f"{signal.Signals(signum).name}: already stopping, waiting for the runs in flight "
            "to save (kill -9 stops at once and loses their cost)",
            file=sys.stderr,
            flush=True,
        )
        return
    raise GridStopped(signum)


def _record(path: Path) -> dict:
    """One of a run's own JSON records (induction.json, train_cost.json, train_spent.json),
    written atomically, so damaged only by hand: then one error line with the fix."""
    from mtp_dist.errors import UserError

    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        return record
    except ValueError as e:
        raise UserError(f"{path} is damaged ({e}): delete it and rerun (a result is rescored, a "
                        "cost restarts from the run's latest checkpoint)") from None  # fmt: skip


def _mark_running(path: Path) -> None:
    """Mark a run's training part started; _add_spent clears the mark (a kill -9 leaves it)."""
    from mtp_dist.files import atomic_write_json

    atomic_write_json(path, {**_record(path), "running": True})


def _add_spent(path: Path, cpu: float, wall: float) -> None:
    """Add one finished (or stopped) training part's seconds to a run's cost."""
    from mtp_dist.files import atomic_write_json

    total = _record(path)
    total.update(cpu=round(total["cpu"] + cpu, 1), wall=round(total["wall"] + wall, 1),
                 parts=total["parts"] + 1, running=False)  # fmt: skip
    atomic_write_json(path, total)


def task_paths(a) -> dict[str, Path]:
    """The task's documents (the corpus, or the copy control made from it), its shards and its
    names.json, under WORKDIR/data."""
    data = a.workdir / "data"
    source, prefix = (data / "corpus", "") if a.task == "code" else (data / "copy", "copy-")
    return {"source": source, "names": source / "names.json",
            "train": data / f"{prefix}train", "heldout": data / f"{prefix}heldout"}  # fmt: skip


def prepare_data(a) -> dict:
    """Corpus, tokenizer, the copy control (--task copy) and the task's shards under
    WORKDIR/data (each stage skipped when done); the check that every name is two tokens;
    returns the task's names.json and the check's count."""
    from data_prep.induction import check_two_tokens, read_names
    from data_prep.tokenizers import load_tokenizer

    data, py = a.workdir / "data", sys.executable
    corpus, tok, logs = data / "corpus", data / "tok" / "tokenizer", data / "logs"
    if not (corpus / "names.json").exists():  # written last, atomically
        _run([py, "-m", "data_prep", "induction-corpus", str(corpus), "--seed", "0",
              "--max-mb", str(a.corpus_mb), "--heldout-mb", "0.6"],
             logs / "corpus.log")  # fmt: skip
    if not Path(f"{tok}.model").exists():
        _run([py, "-m", "data_prep", "train-tokenizer", str(corpus / "train" / "*.jsonl"),
              "--output", str(tok), "--vocab-size", str(a.vocab), "--input-sentence-size",
              "300000", "--user-symbols", str(corpus / "name_pieces.txt")],
             logs / "tokenizer.log")  # fmt: skip
    paths = task_paths(a)
    if a.task == "copy" and not paths["names"].exists():
        _run([py, "-m", "data_prep", "induction-copy", str(corpus), str(paths["source"]),
              "--seed", "0", "--docs", str(a.copy_docs)], logs / "copy.log")  # fmt: skip
    for split in ("train", "heldout"):
        _run([py, "-m", "data_prep", "tokenize", str(paths["source"] / split / "*.jsonl"),
              "--output-dir", str(paths[split]), "--tokenizer", f"{tok}.model", "--no-progress"],
             logs / f"tokenize-{a.task}-{split}.log")  # fmt: skip
    info = read_names(str(paths["source"]))
    files = sorted(str(p) for p in paths["source"].glob("*/*.jsonl"))
    info["two_token_occurrences_checked"] = check_two_tokens(
        load_tokenizer(f"{tok}.model"), info, files
    )
    return info


def run_config(a, width: int, n: int, seed: int) -> tuple[Path, list[str], int]:
    """A run's directory, its training overrides, and its steps."""
    steps = max(a.evals, a.tokens // (a.seq * a.batch))
    steps -= steps % a.evals
    data, paths = a.workdir / "data", task_paths(a)
    overrides = [
        f"model.hidden_size={width}",
        f"model.num_attention_heads={width // 32}",
        f"model.n_future_tokens={n}", f"model.num_layers={a.layers - n}",
        f"model.seq_length={a.seq}", f"model.vocab_size={a.vocab}",
        f"train.steps={steps}", f"train.global_batch_size={a.batch}", f"train.lr={a.lr}",
        f"train.warmup_steps={max(1, steps // 20)}", f"train.seed={seed}",
        f"checkpoint.interval={steps // a.evals}", f"checkpoint.keep={a.evals + 1}",
        f"data.paths=[{paths['train']}]", f"data.tokenizer={data / 'tok' / 'tokenizer.model'}",
    ] + (["model.init_scaled_output=true"] if a.scaled_init else [])  # fmt: skip
    # The settings in the name: a rerun with other --tokens, --lr, ... never reuses a result.
    digest = hashlib.sha256(json.dumps([overrides, a.max_windows]).encode()).hexdigest()[:8]
    run_dir = a.workdir / "runs" / f"d{width}-n{n}-seed{seed}-{digest}"
    return run_dir, [f"run.dir={run_dir}", *overrides], steps


def drop_stop_checkpoints(manager, interval: int) -> None:
    """Before a run resumes: a checkpoint saved when an earlier stop came, off the schedule,
    served its resume and is not scored. It is removed, so that the trainer's keep-last-(evals
    + 1) never prunes a scheduled one (before: a run stopped twice lost its first curve point)."""
    from mtp_dist.checkpointing import step_of

    latest = manager.latest()
    for c in manager.committed():
        if c != latest and step_of(c) % interval:
            shutil.rmtree(c)


def score_command(a, checkpoints: list[Path]) -> list[str]:
    """`evaluate induction` of a run's checkpoints on the held-out split's first --max-windows
    windows, one JSON object per checkpoint on stdout."""
    paths = task_paths(a)
    return [sys.executable, "-m", "mtp_dist.evaluate", "induction", *map(str, checkpoints),
            "--data", str(paths["heldout"]), "--names", str(paths["names"]),
            "--max-windows", str(a.max_windows), "--json"]  # fmt: skip


def curve_point(score: dict, tokens_per_step: int) -> dict:
    """One point of a run's curve, from one checkpoint's `evaluate induction --json` object."""
    return {"step": score["step"], "tokens": score["step"] * tokens_per_step,
            "induction_success": score["induction_success"], "head1_loss": score["head1_loss"],
            "scored_loss": score["scored_loss"], "scored": score["scored_occurrences"],
            "first_half_success": score["first_half_success"],
            "first_scored": score["first_half_scored"]}  # fmt: skip


def one_run(a, width: int, n: int, seed: int) -> dict:
    """Train (or reuse) one run and score its checkpoints; the result is kept in the run's
    directory, so a rerun of the grid skips it."""
    from mtp_dist import config as config_mod
    from mtp_dist.checkpointing import CheckpointManager, step_of
    from mtp_dist.files import atomic_write_json
    from mtp_dist.model.costs import parameter_breakdown

    run_dir, overrides, steps = run_config(a, width, n, seed)
    done = run_dir / "induction.json"
    if done.exists():
        return _record(done)
    py = sys.executable
    interval = steps // a.evals
    manager = CheckpointManager(run_dir / "checkpoints", keep=1)  # reads only: prunes nothing
    cost = run_dir / "train_cost.json"  # kept apart: deleting induction.json only rescores
    # Every training command of this run, those the grid stopped included.
    spent = run_dir / "train_spent.json"
    if not cost.exists():
        # An interrupted run resumes from its latest checkpoint. Its cost is that of every part
        # since the first one recorded: from step 0 unless a part went unrecorded (a kill -9
        # leaves its part running: the count restarts from here).
        latest = manager.latest()
        if not spent.exists() or _record(spent)["running"]:
            from_step = step_of(latest) if latest else 0
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(spent, {"cpu": 0.0, "wall": 0.0, "parts": 0, "running": False,
                                      "from_step": from_step})  # fmt: skip
        drop_stop_checkpoints(manager, interval)
        train = [py, "-m", "mtp_dist.train", "--config", "configs/induction.yaml", *overrides]
        _run(train, run_dir / "train.log", spent=spent)
        # A trainer stopped by a signal saves and exits 0 (a scheduler's preemption): the
        # run is finished only if its last checkpoint is the last step.
        latest = manager.latest()
        if latest is None or step_of(latest) != steps:
            at = step_of(latest) if latest else 0
            raise SystemExit(f"error: {run_dir.name}: training stopped at step {at} of {steps} "
                             "(a signal); rerun the same command to resume it")  # fmt: skip
        atomic_write_json(cost, _record(spent))
    train_cost = _record(cost)
    from_step = train_cost.get("from_step", 0)  # absent in runs recorded before it was kept
    # The scheduled checkpoints only: a run stopped and resumed also keeps the one it saved
    # when it was stopped.
    checkpoints = [c for c in manager.committed() if step_of(c) % interval == 0]
    score_cpu = _run(score_command(a, checkpoints), run_dir / "score.log",
                     stdout=run_dir / "scores.json")  # fmt: skip
    scores = json.loads((run_dir / "scores.json").read_text())
    cfg = config_mod.load("configs/induction.yaml", overrides)
    params = parameter_breakdown(cfg.model)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tokens_per_step = a.seq * a.batch
    result = {
        "width": width, "n": n, "seed": seed, "layers": a.layers,
        "non_embedding_params": params["trunk"] + params["heads"],
        "steps": steps, "tokens": steps * tokens_per_step,
        # The training cost of the steps after trained_from_step (0 unless a part of a resumed
        # run went unrecorded), the steps a stopped part redid after its last checkpoint included.
        "train_wall_seconds": train_cost["wall"],
        "train_cpu_seconds": train_cost["cpu"],
        "trained_from_step": from_step,
        "score_cpu_seconds": round(score_cpu, 1),
        # Tokens per CPU second: what one idle core would give (the wall rate depends on load).
        "tokens_per_cpu_s": round((steps - from_step) * tokens_per_step / train_cost["cpu"]),
        "tokens_per_s_wall": round(statistics.median(m["tokens_per_s"] for m in metrics)),
        "curve": [curve_point(s, tokens_per_step) for s in scores],
        "overrides": overrides,
    }  # fmt: skip
    last = result["curve"][-1]
    result.update({k: last[k] for k in ("induction_success", "first_half_success", "head1_loss")})
    atomic_write_json(done, result)
    return result


def _stop_grid() -> None:
    """Start no more commands, and stop those in flight (a trainer saves a checkpoint on
    SIGTERM, so a rerun resumes it)."""
    with _RUNNING_LOCK:
        _STOPPING.set()
        for proc in _RUNNING:
            proc.terminate()


def _run_or_stop_grid(a, width: int, n: int, seed: int) -> dict:
    """one_run; if it fails, the failing thread stops the grid itself, before it could take
    the next queued run."""
    try:
        return one_run(a, width, n, seed)
    except BaseException:
        _stop_grid()
        raise


def run_grid(a) -> list[dict]:
    cells = [(w, n, s) for w in a.widths for s in range(a.seeds) for n in a.ns]
    results, lock, t0 = [], threading.Lock(), time.time()
    # Widest first: the grid ends with short runs, so no job idles long at the end.
    cells.sort(key=lambda c: -c[0])
    # The ETA counts the runs this invocation computes, not the finished ones it reuses.
    reused = {c: (run_config(a, *c)[0] / "induction.json").exists() for c in cells}
    to_compute, computed = len(cells) - sum(reused.values()), 0
    pool = concurrent.futures.ThreadPoolExecutor(a.jobs)
    try:
        futures = {pool.submit(_run_or_stop_grid, a, *c): c for c in cells}
        for f in concurrent.futures.as_completed(futures):
            r = f.result()
            with lock:
                results.append(r)
                computed += not reused[futures[f]]
                elapsed = time.time() - t0
                left = to_compute - computed
                if not left:
                    eta = "0.0 min"
                elif computed:
                    eta = f"{elapsed / computed * left / 60:.1f} min"
                else:
                    eta = "?"  # nothing computed yet to time
                print(f"[{len(results)}/{len(cells)}] d={r['width']} n={r['n']} seed={r['seed']}:"
                      f" success {r['induction_success']:.4f}, head 1 loss {r['head1_loss']:.3f}"
                      f" | {elapsed / 60:.1f} min, eta {eta}", flush=True)  # fmt: skip
    except BaseException:
        # A run failed (or a stop signal): report now, not after the other runs.
        pool.shutdown(wait=False, cancel_futures=True)
        _stop_grid()
        raise
    finally:
        pool.shutdown(wait=True)  # the stopped commands have exited: nothing left behind
    return sorted(results, key=lambda r: (r["width"], r["n"], r["seed"]))


LEARNED = 0.5  # success at which a run counts as having learned induction (chance: 1/16-1/32)
MEASURES = ("induction_success", "first_half_success")  # the paper's, then the second


def learned_at(run: dict, key: str) -> int | None:
    """Tokens seen at the first scored checkpoint where the measure `key` reached LEARNED."""
    return next((p["tokens"] for p in run["curve"] if (p[key] or 0.0) >= LEARNED), None)


def learned_either(run: dict) -> bool:
    return any(learned_at(run, k) is not None for k in MEASURES)


def first_learned(run: dict, measures: tuple[str, ...] = MEASURES) -> float:
    """Tokens at which a run first reached LEARNED by any of `measures` (by default either);
    inf if not by its end."""
    seen = [learned_at(run, k) for k in measures]
    return min((t for t in seen if t is not None), default=math.inf)


def sign_test(n2_first: int, n1_first: int) -> float:
    """One-sided sign test of the paper's direction: the chance of at least n2_first n=2-first
    pairs among the decided ones if which learned first were a coin flip."""
    decided = n2_first + n1_first
    return sum(math.comb(decided, k) for k in range(n2_first, decided + 1)) / 2**decided


def paired(results: list[dict], measures: tuple[str, ...] = MEASURES) -> list[dict]:
    """Per width, over the seeds run with both n=1 and n=2: in how many pairs n=2 learned first
    (by any of `measures`, by default either; a run that never learned counts as after any that
    did), n=1 first, or neither (the same checkpoint, or neither learned); and the sign test."""
    by = {(r["width"], r["n"], r["seed"]): r for r in results}
    rows = []
    for width in sorted({r["width"] for r in results}):
        seeds = sorted(s for (w, n, s) in by if w == width and n == 1 and (w, 2, s) in by)
        order = [first_learned(by[width, 2, s], measures) - first_learned(by[width, 1, s], measures)
                 for s in seeds]  # fmt: skip
        n2_first = sum(d < 0 for d in order)
        n1_first = sum(d > 0 for d in order)
        rows.append({"width": width, "pairs": len(seeds), "n2_first": n2_first,
                     "n1_first": n1_first, "neither": len(seeds) - n2_first - n1_first,
                     "sign_test_p": sign_test(n2_first, n1_first)})  # fmt: skip
    return rows


def pairs_table(rows: list[dict], what: str) -> list[str]:
    """The pairs' table, with a last row over every width (the sign test over all the pairs)."""
    rows = [p for p in rows if p["pairs"]]
    if not rows:
        return []
    lines = ["", f"Which learned first, seed by seed ({what}; one-sided sign test of the "
             "paper's direction, n=2 first, over the decided pairs):", "",
             "| width | pairs | n=2 first | n=1 first | neither | p |",
             "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for p in rows:
        lines.append(f"| {p['width']} | {p['pairs']} | {p['n2_first']} | {p['n1_first']} | "
                     f"{p['neither']} | {p['sign_test_p']:.3f} |")  # fmt: skip
    if len(rows) > 1:
        total = {k: sum(p[k] for p in rows) for k in ("pairs", "n2_first", "n1_first", "neither")}
        p = sign_test(total["n2_first"], total["n1_first"])
        lines.append(f"| all | {total['pairs']} | {total['n2_first']} | {total['n1_first']} | "
                     f"{total['neither']} | {p:.4f} |")  # fmt: skip
    return lines


def summarise(results: list[dict]) -> list[dict]:
    """Per (width, n): mean and seed-to-seed standard deviation; per width: n=2 - n=1."""
    cells = {}
    for r in results:
        cells.setdefault((r["width"], r["n"]), []).append(r)
    rows = []
    for (width, n), rs in sorted(cells.items()):
        s = [r["induction_success"] for r in rs]
        first = [r["first_half_success"] or 0.0 for r in rs]
        loss = [r["head1_loss"] for r in rs]
        rows.append({
            "width": width, "n": n, "non_embedding_params": rs[0]["non_embedding_params"],
            "seeds": len(rs), "success_mean": statistics.mean(s),
            "success_std": statistics.stdev(s) if len(s) > 1 else 0.0,
            "first_half_mean": statistics.mean(first),
            "first_half_std": statistics.stdev(first) if len(first) > 1 else 0.0,
            "head1_loss_mean": statistics.mean(loss),
            "head1_loss_std": statistics.stdev(loss) if len(loss) > 1 else 0.0,
            "seeds_learned": sum(learned_either(r) for r in rs),
        })  # fmt: skip
    return rows


def tables(results: list[dict], summary: list[dict], chance: float, first_chance: float) -> str:
    def at(run, key):
        tokens = learned_at(run, key)
        return "-" if tokens is None else f"{tokens / 1e6:.2f}M"

    lines = ["| width | non-emb. params | n | seed | tokens | induction success | first-half "
             f"success | head 1 loss | >= {LEARNED} from (induction / first-half) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in results:
        first = r["first_half_success"]
        lines.append(f"| {r['width']} | {r['non_embedding_params'] / 1e6:.2f}M | {r['n']} | "
                     f"{r['seed']} | {r['tokens'] / 1e6:.2f}M | {r['induction_success']:.4f} | "
                     f"{'-' if first is None else f'{first:.4f}'} | "
                     f"{r['head1_loss']:.4f} | {at(r, 'induction_success')} / "
                     f"{at(r, 'first_half_success')} |")  # fmt: skip
    lines += ["", f"Mean ± seed-to-seed std (chance {chance:.4f}; first-half success: the second "
              f"measure of mtp_dist/evaluate/induction.py, chance {first_chance:.4f} or a little "
              "above; learned: seeds where either measure "
              f"reached {LEARNED} at a scored checkpoint):", "",
              "| non-emb. params | n | seeds | induction success | first-half success | "
              "head 1 loss | learned |", "|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for s in summary:
        lines.append(f"| {s['non_embedding_params'] / 1e6:.2f}M | {s['n']} | {s['seeds']} | "
                     f"{s['success_mean']:.4f} ± {s['success_std']:.4f} | "
                     f"{s['first_half_mean']:.4f} ± {s['first_half_std']:.4f} | "
                     f"{s['head1_loss_mean']:.4f} ± {s['head1_loss_std']:.4f} | "
                     f"{s['seeds_learned']} of {s['seeds']} |")  # fmt: skip
    lines += pairs_table(paired(results), "either measure")
    lines += pairs_table(paired(results, ("induction_success",)), "the paper's measure alone")
    return "\n".join(lines)


def plot(
    results: list[dict],
    summary: list[dict],
    chance: float,
    first_chance: float,
    out: Path,
    title: str = "after the full token budget",
) -> None:
    """Like the paper's Figure 7 (success against size, n=1 and n=2, error bars over seeds),
    and success against tokens seen per size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mtp_dist.files import atomic_path

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    ns = sorted({s["n"] for s in summary})
    colour = {n: f"C{i}" for i, n in enumerate(ns)}
    for n in ns:
        rows = [s for s in summary if s["n"] == n]
        sizes = [s["non_embedding_params"] for s in rows]
        left.errorbar(sizes, [s["success_mean"] for s in rows],
                      yerr=[s["success_std"] for s in rows], color=colour[n], marker="o",
                      capsize=4, label=f"n={n} (mean ± std over seeds)")  # fmt: skip
        each = [r for r in results if r["n"] == n]
        left.scatter([r["non_embedding_params"] for r in each],
                     [r["induction_success"] for r in each],
                     color=colour[n], s=10, alpha=0.4)  # fmt: skip
        left.errorbar(sizes, [s["first_half_mean"] for s in rows],
                      yerr=[s["first_half_std"] for s in rows], color=colour[n], marker="s",
                      capsize=4, linestyle="--", alpha=0.6,
                      label=f"n={n}, first halves (second measure)")  # fmt: skip
    for ax in (left, right):
        ax.axhline(chance, color="grey", linestyle=":", label=f"chance ({chance:.3f})")
        ax.axhline(first_chance, color="grey", linestyle="-.", alpha=0.6,
                   label=f"first-half chance ({first_chance:.3f})")  # fmt: skip
        ax.set_ylabel("induction success")
        ax.set_ylim(-0.05, 1.1)
    left.set_xscale("log")
    left.set_xlabel("non-embedding parameters")
    left.set_title(title)
    for k, width in enumerate(sorted({r["width"] for r in results})):
        for n, style in zip(ns, ("-", "--", ":"), strict=False):
            # The mean over the seeds that have a point at those tokens (a run stopped twice
            # before the grid removed earlier stops' checkpoints may lack an early one).
            at = {}
            for r in results:
                if r["width"] == width and r["n"] == n:
                    for point in r["curve"]:
                        at.setdefault(point["tokens"], []).append(point)
            xs = sorted(at)
            ys = [statistics.mean(q["induction_success"] for q in at[x]) for x in xs]
            right.plot(xs, ys, style, color=f"C{k + 2}", marker="o", label=f"d={width}, n={n}")
            first = [statistics.mean(q["first_half_success"] or 0.0 for q in at[x]) for x in xs]
            right.plot(xs, first, style, color=f"C{k + 2}", marker="s", alpha=0.45,
                       label=f"d={width}, n={n}, first halves")  # fmt: skip
    right.set_xlabel("tokens seen")
    right.set_title("during training (mean over seeds; squares: first halves)")
    left.legend(fontsize=8)
    right.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main(argv=None) -> int:
    from mtp_dist.compat import quiet_upstream_warnings
    from mtp_dist.files import atomic_write_json

    quiet_upstream_warnings()  # the parameter count imports megatron-core here
    a = parse_args(argv)
    a.workdir = a.workdir.resolve()
    t0 = time.time()
    handlers = {sig: signal.signal(sig, _on_stop_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        info = prepare_data(a)
        checked = info["two_token_occurrences_checked"]
        print(f"data ({a.task}): {info['documents']} documents, {checked} name occurrences "
              "checked to be two tokens", flush=True)  # fmt: skip
        results = run_grid(a)
    except GridStopped as e:
        print(f"error: stopped by {e}: the commands in flight were stopped, each trainer at a "
              "checkpoint, and their cost kept; rerun the same command to resume",
              file=sys.stderr)  # fmt: skip
        return 128 + e.signum
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    summary = summarise(results)
    first_chance = 1 / len(info["first"])  # a guess among the first-half pieces
    print(tables(results, summary, info["chance"], first_chance))
    png = a.out.with_suffix(".png")
    plot(results, summary, info["chance"], first_chance, png)
    payload = {
        "benchmark": "induction", "grid": a.grid,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "data": {**{k: v for k, v in info.items() if k not in ("first", "second")},
                 "first_chance": first_chance},
        "cores": os.cpu_count(), "load_average": os.getloadavg(),
        "wall_seconds": round(time.time() - t0, 1),
        "summary": summary, "pairs": paired(results),
        "pairs_paper_measure": paired(results, ("induction_success",)),
        "runs": results, "paper": PAPER,
    }  # fmt: skip
    atomic_write_json(a.out, payload)
    print(f"wrote {a.out} and {png} ({(time.time() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    from mtp_dist.errors import run_cli

    sys.exit(run_cli(main))
