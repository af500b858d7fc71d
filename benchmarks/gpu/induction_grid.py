"""The induction grid (benchmarks/induction.py's runs) on one GPU, under a deadline: a lent GPU's
few minutes train the sizes past the token budgets that 2 CPU cores allow.

Every run of the grid starts at once, one process each, with the CPU grid's settings (the same
configs/induction.yaml and overrides, fp32 as on the CPU; only the micro batch is the whole
global batch, one forward a step). At --train-seconds the runs still training are stopped (each
saves a checkpoint); then every scheduled checkpoint reached is scored as the CPU grid scores it
(`python -m mtp_dist.evaluate induction`). A run's curve is what it reached. Within a width the
runs are compared at the last scheduled checkpoint all of them reached (the runs do not all
train at the same speed), so the tables and the figure never compare runs at different token
counts. A rerun on the same machine resumes every run from its latest checkpoint (the trainer's
resume=auto): two calls of a lease extend the same runs, and the second scores them all.
SIGTERM or Ctrl-C stops it as the deadline would, then exits 128 + the signal, unscored.

Here, on CPU (the held-out and training shards, the tokenizer and names.json; carry the folder):
    python benchmarks/gpu/induction_grid.py --prepare-only   # -> runs/induction-gpu/data
On the GPU machine, after benchmarks/gpu/run.py's install step:
    python benchmarks/gpu/induction_grid.py --tokens 24e6 --evals 24 --train-seconds 330
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import induction as grid  # noqa: E402  (benchmarks/induction.py)

OUT = ROOT / "benchmarks" / "gpu" / "out" / "induction_gpu.json"
STOP_WAIT_SECONDS = 120
"""How long stopped trainers get to save their checkpoint before they are killed."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="runs/induction-gpu", help="relative to the repo root")
    p.add_argument("--widths", default="32,64,128")
    p.add_argument("--ns", default="1,2")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--tokens", type=float, default=24e6, help="each run's budget (schedule)")
    p.add_argument("--evals", type=int, default=24, help="scheduled checkpoints per run")
    p.add_argument("--train-seconds", type=float, default=330.0, help="then stop and score")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    for flag in ("--seq", "--batch", "--vocab", "--corpus-mb", "--max-windows"):
        p.add_argument(flag, help="as benchmarks/induction.py's (its default)")
    p.add_argument("--score-jobs", type=int, default=8, help="scoring commands at once")
    p.add_argument("--prepare-only", action="store_true", help="make WORKDIR/data and stop")
    p.add_argument("--report", type=Path, metavar="JSON",
                   help="only print the tables of a JSON it wrote; redraw its PNG")  # fmt: skip
    p.add_argument("--out", type=Path, default=OUT, help="JSON (the PNG beside it)")
    g = p.parse_args(argv)
    if g.train_seconds <= 0 or g.score_jobs < 1:
        grid._usage("--train-seconds must be > 0 and --score-jobs >= 1")
    a = grid.parse_args(["--workdir", g.workdir, "--widths", g.widths, "--ns", g.ns,
                         "--layers", str(g.layers), "--seeds", str(g.seeds),
                         "--tokens", str(g.tokens), "--evals", str(g.evals),
                         *[x for k in ("seq", "batch", "vocab", "corpus_mb", "max_windows")
                           if getattr(g, k) is not None
                           for x in (f"--{k.replace('_', '-')}", getattr(g, k))]])  # fmt: skip
    return g, a


def last_step(run_dir: Path) -> int:
    """The last step the run's metrics.jsonl records (0 before its first)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError):
        return 0  # not written yet, or a line being written


def train_all(a, g, cells: list[tuple]) -> dict:
    """Start (or resume) every run, report progress, stop those still training at the
    deadline. Returns {cell: (run_dir, overrides, steps, wall seconds, step resumed from)}; a
    failed run stops all and exits 1."""
    from mtp_dist.checkpointing import CheckpointManager

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs, runs, t0 = {}, {}, time.time()
    deadline, tokens_per_step = t0 + g.train_seconds, a.seq * a.batch
    try:  # from the first start: a failed start or a stop signal stops those already started
        for cell in cells:
            run_dir, overrides, steps = grid.run_config(a, *cell)
            overrides = [*overrides, f"train.dtype={g.dtype}",
                         f"train.micro_batch_size={a.batch}"]  # fmt: skip
            run_dir.mkdir(parents=True, exist_ok=True)
            grid.drop_stop_checkpoints(CheckpointManager(run_dir / "checkpoints", keep=1),
                                       steps // a.evals)  # fmt: skip
            runs[cell] = [run_dir, overrides, steps, None, last_step(run_dir)]
            cmd = [sys.executable, "-m", "mtp_dist.train", "--config", "configs/induction.yaml",
                   *overrides]  # fmt: skip
            with open(run_dir / "train.log", "w") as log:
                procs[cell] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log)
        while any(p.poll() is None for p in procs.values()):
            failed = [c for c, p in procs.items() if p.poll() not in (None, 0)]
            if failed:
                run_dir = runs[failed[0]][0]
                tail = (run_dir / "train.log").read_text()[-3000:]
                raise SystemExit(f"error: {run_dir.name} failed ({procs[failed[0]].returncode}):"
                                 f"\n{tail}")  # fmt: skip
            for c, p in procs.items():
                if p.poll() is not None and runs[c][3] is None:
                    runs[c][3] = time.time() - t0
            if time.time() >= deadline:
                break
            time.sleep(min(15.0, max(0.5, deadline - time.time())))
            done = {c: last_step(r[0]) for c, r in runs.items()}
            new = {c: done[c] - r[4] for c, r in runs.items()}  # this invocation's steps
            elapsed = time.time() - t0
            rate = sum(new.values()) * tokens_per_step / elapsed
            left = max((r[2] - done[c]) / max(new[c], 1) * elapsed for c, r in runs.items())
            print(
                f"{elapsed:5.0f} s: {sum(done.values()):,} steps of "
                f"{sum(r[2] for r in runs.values()):,} ({rate / 1e6:.2f}M tokens/s in all); "
                f"slowest run at {min(done.values())}; eta {left:.0f} s",
                flush=True,
            )
    finally:
        grid._STOPPING.set()  # a second stop signal only says so (grid._on_stop_signal)
        stopped = [c for c, p in procs.items() if p.poll() is None]
        for c in stopped:
            procs[c].terminate()  # the trainer saves a checkpoint and exits
        for c in stopped:
            try:
                procs[c].wait(timeout=max(1.0, t0 + g.train_seconds + STOP_WAIT_SECONDS
                                          - time.time()))  # fmt: skip
            except subprocess.TimeoutExpired:
                procs[c].kill()
                procs[c].wait()
                print(f"{runs[c][0].name}: killed, not saved in {STOP_WAIT_SECONDS} s",
                      file=sys.stderr)  # fmt: skip
    for c in runs:
        runs[c][3] = runs[c][3] or time.time() - t0
    if stopped:
        print(
            f"stopped {len(stopped)} of {len(cells)} runs at the deadline "
            f"({g.train_seconds:.0f} s)",
            flush=True,
        )
    return {c: tuple(r) for c, r in runs.items()}


def score(a, g, runs: dict) -> list[dict]:
    """Every run's scheduled checkpoints scored (several commands at once); the records."""
    from mtp_dist.checkpointing import CheckpointManager, step_of
    from mtp_dist.config import load
    from mtp_dist.model.costs import parameter_breakdown

    tokens_per_step = a.seq * a.batch

    def one(cell):
        run_dir, overrides, steps, wall, resumed_from = runs[cell]
        interval = steps // a.evals
        manager = CheckpointManager(run_dir / "checkpoints", keep=1)  # reads only
        checkpoints = [c for c in manager.committed() if step_of(c) % interval == 0]
        curve = []
        if checkpoints:
            cmd = grid.score_command(a, checkpoints)
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"error: scoring {run_dir.name} failed:\n{proc.stderr[-3000:]}")
            curve = [grid.curve_point(s, tokens_per_step) for s in json.loads(proc.stdout)]
        params = parameter_breakdown(load("configs/induction.yaml", overrides).model)
        metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        reached = metrics[-1]["step"] if metrics else 0
        width, n, seed = cell
        return {"width": width, "n": n, "seed": seed, "layers": a.layers,
                "non_embedding_params": params["trunk"] + params["heads"],
                "steps": steps, "steps_trained": reached, "finished": reached == steps,
                "resumed_from_step": resumed_from, "train_wall_seconds": round(wall, 1),
                "tokens_per_s_wall": round(statistics.median(m["tokens_per_s"]
                                                             for m in metrics)) if metrics else 0,
                "curve": curve, "overrides": overrides}  # fmt: skip

    with concurrent.futures.ThreadPoolExecutor(g.score_jobs) as pool:
        return list(pool.map(one, runs))


def compared(results: list[dict]) -> tuple[list[dict], dict]:
    """Each width's runs cut to the last scheduled checkpoint all of them reached, with the
    grid's final-value keys from that point; and those tokens per width."""
    common, cut = {}, []
    for width in sorted({r["width"] for r in results}):
        rs = [r for r in results if r["width"] == width]
        common[width] = min((r["curve"][-1]["tokens"] if r["curve"] else 0) for r in rs)
        for r in rs:
            curve = [p for p in r["curve"] if p["tokens"] <= common[width]]
            if curve:
                last = curve[-1]
                cut.append({**r, "curve": curve, "tokens": last["tokens"],
                            **{k: last[k] for k in ("induction_success", "first_half_success",
                                                    "head1_loss")}})  # fmt: skip
    return cut, common


def report(results: list[dict], chance: float, first_chance: float, png: Path) -> tuple:
    """Print the comparison (each width at its common checkpoint) and draw the figure; returns
    (the compared records, the tokens compared at per width, the summary)."""
    cut, common = compared(results)
    summary = grid.summarise(cut)
    print(", ".join(f"d={w}: compared at {t / 1e6:.2f}M tokens" for w, t in common.items()))
    print(grid.tables(cut, summary, chance, first_chance))
    if cut:
        title = "at the last checkpoint all of a width's runs reached"
        grid.plot(cut, summary, chance, first_chance, png, title=title)
    return cut, common, summary


def main(argv=None) -> int:
    from data_prep.induction import read_names
    from mtp_dist.compat import quiet_upstream_warnings
    from mtp_dist.errors import UserError
    from mtp_dist.files import atomic_write_json

    quiet_upstream_warnings()
    g, a = parse_args(argv)
    if g.report:
        saved = grid._record(g.report)
        if not {"runs", "chance", "first_chance"} <= saved.keys():
            raise UserError(f"--report {g.report}: not a JSON of this script (it needs runs, "
                            "chance and first_chance): give its --out")  # fmt: skip
        report(saved["runs"], saved["chance"], saved["first_chance"], g.report.with_suffix(".png"))
        return 0
    os.chdir(ROOT)  # the workdir and the runs' data paths are relative to the repo root
    if g.prepare_only:
        info = grid.prepare_data(a)
        print(f"{a.workdir / 'data'}: {info['two_token_occurrences_checked']} name occurrences "
              "checked to be two tokens; carry it to the GPU machine")  # fmt: skip
        return 0
    paths = grid.task_paths(a)
    needed = [paths["names"], paths["train"] / "manifest.json", paths["heldout"],
              a.workdir / "data" / "tok" / "tokenizer.model"]  # fmt: skip
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise UserError(f"{', '.join(missing)} missing: run this script with --prepare-only "
                        "where the corpus can be made, and carry WORKDIR/data")  # fmt: skip
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    info = read_names(str(paths["names"]))
    chance, first_chance = info["chance"], 1 / len(info["first"])
    cells = [(w, n, s) for w in a.widths for s in range(a.seeds) for n in a.ns]
    t0 = time.time()
    print(
        f"{len(cells)} runs on {device}, {a.tokens / 1e6:.1f}M tokens each, "
        f"{g.train_seconds:.0f} s to train",
        flush=True,
    )
    stops = (signal.SIGTERM, signal.SIGINT)
    handlers = {sig: signal.signal(sig, grid._on_stop_signal) for sig in stops}
    try:
        runs = train_all(a, g, cells)
        train_seconds = time.time() - t0
        results = sorted(score(a, g, runs), key=lambda r: (r["width"], r["n"], r["seed"]))
    except grid.GridStopped as e:
        print(f"error: stopped by {e}: every run saved a checkpoint; rerun the same command to "
              "resume them", file=sys.stderr)  # fmt: skip
        return 128 + e.signum
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    g.out.parent.mkdir(parents=True, exist_ok=True)
    png = g.out.with_suffix(".png")
    cut, common, summary = report(results, chance, first_chance, png)
    atomic_write_json(g.out, {
        "benchmark": "induction on one GPU", "device": device, "torch": torch.__version__,
        "settings": {**{k: v for k, v in vars(g).items() if k != "out"},
                     "seq": a.seq, "batch": a.batch, "lr": a.lr, "vocab": a.vocab,
                     "max_windows": a.max_windows},
        "data": {k: v for k, v in info.items() if k not in ("first", "second")},
        "chance": chance, "first_chance": first_chance, "cores": os.cpu_count(),
        "train_seconds": round(train_seconds, 1), "wall_seconds": round(time.time() - t0, 1),
        "compared_at_tokens": common, "summary": summary, "pairs": grid.paired(cut),
        "pairs_paper_measure": grid.paired(cut, ("induction_success",)),
        "runs": results, "paper": grid.PAPER,
    })  # fmt: skip
    print(f"wrote {g.out} and {png} ({(time.time() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    from mtp_dist.errors import run_cli

    sys.exit(run_cli(main))
