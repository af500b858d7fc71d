"""Benchmark: whole-command time of every `python -m data_prep` command, this code against an
earlier revision, side by side in one run.

`--baseline REV` extracts that git revision (`git archive`) into a temporary directory; each
command then runs as a fresh process once per version, alternating, `--repeats` times, and the
table shows the median of each. The corpus is the standard library's sources as JSON Lines
(16 shards), topped up with copies of its shards to `--mb` MB (the stdlib alone is ~32 MB); the
tokenizer is trained by `data_prep train-tokenizer` on it (8k BPE), as a timed command. For the
tokenize commands it also shows the time to the first token: from the process's start to the
first batch handed to the tokenizer (a wrapper records it, in the parent or a worker). Both
versions must write byte-identical shards (their sidecars' sha256 are compared).
Prints a table and writes benchmarks/results/data_prep_startup.json.

    python benchmarks/data_prep_startup.py --baseline 5c72268 [--repeats 3] [--mb 50]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data_prep.stdlib_corpus import write_stdlib_corpus  # noqa: E402
from mtp_dist.files import atomic_write_json  # noqa: E402

# Runs the CLI with data_prep.shards._write_batch wrapped to print when the first batch reaches
# the tokenizer; forked workers inherit the wrapper and print their own first batch.
FIRST_TOKEN = """
import os, sys, time
from data_prep import shards
_write_batch = shards._write_batch
def first(*args, **kw):
    if not first.seen:
        first.seen = True
        os.write(2, f"first-token {time.time():.6f}\\n".encode())  # one write: workers interleave
    return _write_batch(*args, **kw)
first.seen = False
shards._write_batch = first
from data_prep.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run(code_dir: str, argv: list[str], first_token: bool) -> dict:
    """One command as a fresh process with code_dir's data_prep: seconds, first token."""
    entry = ["-c", FIRST_TOKEN] if first_token else ["-m", "data_prep"]
    env = {**os.environ, "PYTHONPATH": code_dir, "PYTHONWARNINGS": "ignore"}
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, *entry, *argv], cwd=code_dir, env=env, capture_output=True, text=True
    )
    seconds = time.time() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed in {code_dir}:\n{proc.stderr}")
    stamps = [float(ln.split()[1]) for ln in proc.stderr.splitlines() if ln.startswith("first-")]
    return {"seconds": seconds, "first_token_s": min(stamps) - t0 if stamps else None}


def corpus(work: str, mb: float) -> list[str]:
    """The stdlib corpus, topped up with copies of its shards to `mb` MB of JSON Lines."""
    paths = write_stdlib_corpus(os.path.join(work, "corpus"), num_shards=16)
    size = sum(os.path.getsize(p) for p in paths)
    for i, source in enumerate(paths * 2):
        if size >= mb * 1e6:
            break
        copy = os.path.join(work, "corpus", f"copy-{i:05d}.jsonl")
        shutil.copyfile(source, copy)
        paths.append(copy)
        size += os.path.getsize(copy)
    return paths


def checksums(out_dir: str) -> dict:
    """Each shard's sha256 (of its .bin and .idx), from its sidecar."""
    found = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "shard-*.json"))):
        with open(path) as f:
            found[os.path.basename(path)] = json.load(f)["sha256"]
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", default=None, help="git revision to compare with")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mb", type=float, default=50.0, help="corpus size (JSON Lines bytes)")
    p.add_argument("--workers", type=int, default=2, help="of the large tokenize")
    p.add_argument(
        "--output",
        default=os.path.join(ROOT, "benchmarks", "results", "data_prep_startup.json"),
    )
    a = p.parse_args()
    work = tempfile.mkdtemp(prefix="bench-data-prep-startup-")
    try:
        versions = {"this": ROOT}
        if a.baseline:
            base = os.path.join(work, "baseline")
            os.makedirs(base)
            archive = subprocess.run(
                ["git", "-C", ROOT, "archive", a.baseline], check=True, capture_output=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", base], input=archive, check=True)
            versions = {"baseline": base, **versions}
        paths = corpus(work, a.mb)
        mb = sum(os.path.getsize(p) for p in paths) / 1e6
        small = os.path.join(work, "small.jsonl")  # a small array task's input: ~1 MB
        with open(paths[0]) as src, open(small, "w") as dst:
            for line in src:
                dst.write(line)
                if dst.tell() > 1e6:
                    break
        tok = os.path.join(work, "tok", "tokenizer")

        def out(version: str, what: str) -> str:
            return os.path.join(work, version, what)

        def tokenize(version: str, what: str, inputs: list[str], workers: int) -> list[str]:
            shutil.rmtree(out(version, what), ignore_errors=True)
            return ["tokenize", *inputs, "--output-dir", out(version, what), "--tokenizer",
                    tok + ".model", "--workers", str(workers), "--no-progress"]  # fmt: skip

        commands = [
            ("--help", lambda v: ["--help"], False),
            ("tokenize --help", lambda v: ["tokenize", "--help"], False),
            (
                "stdlib-corpus (1 MB)",
                lambda v: ["stdlib-corpus", out(v, "stdlib"), "--max-mb", "1", "--num-shards", "1"],
                False,
            ),
            (
                f"train-tokenizer ({mb:.0f} MB, 8k BPE)",
                lambda v: [
                    "train-tokenizer",
                    *paths,
                    "--output",
                    tok,
                    "--vocab-size",
                    "8000",
                    "--input-sentence-size",
                    "300000",
                ],  # fmt: skip
                False,
            ),
            ("tokenize (1 MB, 1 worker)", lambda v: tokenize(v, "small", [small], 1), True),
            (
                f"tokenize ({mb:.0f} MB, {a.workers} workers)",
                lambda v: tokenize(v, "large", paths, a.workers),
                True,
            ),
            ("manifest", lambda v: ["manifest", out(v, "large")], False),
            ("verify", lambda v: ["verify", out(v, "large")], False),
        ]
        times: dict = {(what, v): [] for what, _, _ in commands for v in versions}
        for _ in range(a.repeats):
            for what, argv, first in commands:
                for version, code_dir in versions.items():
                    times[what, version].append(run(code_dir, argv(version), first))
        if a.baseline:
            for what in ("small", "large"):
                same = checksums(out("baseline", what)) == checksums(out("this", what))
                assert same, f"the {what} shards differ between the versions"

        rows = []
        for what, _, _ in commands:
            for version in versions:
                runs = times[what, version]
                firsts = [r["first_token_s"] for r in runs if r["first_token_s"] is not None]
                rows.append(
                    {
                        "command": what,
                        "version": version,
                        "seconds_median": statistics.median(r["seconds"] for r in runs),
                        "first_token_s_median": statistics.median(firsts) if firsts else None,
                        "runs": runs,
                    }
                )
        print(
            f"corpus: {len(paths)} JSON Lines files, {mb:.1f} MB; {a.repeats} alternating runs "
            f"each, median; baseline {a.baseline or '(none)'}; {os.cpu_count()} cores, load "
            f"{os.getloadavg()[0]:.1f}"
        )
        print(f"{'command':<34} {'version':<9} {'whole s':>8} {'first token s':>14}")
        for r in rows:
            first = r["first_token_s_median"]
            first_text = "" if first is None else f"{first:.2f}"
            print(
                f"{r['command']:<34} {r['version']:<9} {r['seconds_median']:>8.2f} {first_text:>14}"
            )
        result = {
            "corpus": {"files": len(paths), "mb": mb},
            "baseline": a.baseline,
            "repeats": a.repeats,
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "load_avg_1m": os.getloadavg()[0],
            },
            "rows": rows,
        }
        os.makedirs(os.path.dirname(a.output), exist_ok=True)
        atomic_write_json(a.output, result)
        print(f"wrote {a.output}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
