"""Step 2 of the GPU check, on the GPU machine (no network needed), from the repository root:

    python benchmarks/gpu/run.py                     # the bundle of prepare.py, 8-minute budget

1. checks the bundle (benchmarks/gpu/bundle/, from prepare.py) against its manifest;
2. installs it offline: pip --no-index --no-deps, the wheels by path (the machine's image has
   the rest: torch, transformers, numpy, ...), then imports megatron.core, deepspeed, mtp_dist;
3. runs `pytest -m gpu` (tests/test_gpu.py; nothing written into tracked files);
4. runs the throughput benchmark (benchmarks/gpu/throughput.py), its table on the console and
   its JSON in benchmarks/gpu/out/ (ignored by git).
Each step gets what is left of --budget seconds; the summary says which passed, and the exit
status is 0 only if all did. --dry-run prints the commands without running them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prepare import BUNDLE, ROOT, check_bundle, fail  # noqa: E402

OUT = ROOT / "benchmarks" / "gpu" / "out"


def steps(bundle: Path, out: Path, max_micro_batch: int) -> list[tuple[str, list[str]]]:
    py = sys.executable
    wheels = [str(w) for w in sorted(bundle.glob("*.whl"))]
    return [
        ("install", [py, "-m", "pip", "install", "--no-index", "--no-deps",
                     "--find-links", str(bundle), *wheels]),
        ("imports", [py, "-c", "import megatron.core, deepspeed, mtp_dist.train; "
                     "print('megatron-core', megatron.core.__version__, 'deepspeed', "
                     "deepspeed.__version__)"]),
        ("pytest -m gpu", [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                           "tests/test_gpu.py"]),
        ("throughput", [py, "benchmarks/gpu/throughput.py", "--max-micro-batch",
                        str(max_micro_batch), "--steps", "3", "--warmup", "1",
                        "--out", str(out / "throughput.json")]),
    ]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bundle", type=Path, default=BUNDLE, help="prepare.py's folder")
    p.add_argument("--out", type=Path, default=OUT, help="where the benchmark's JSON goes")
    p.add_argument("--budget", type=float, default=480.0, help="seconds in all (480)")
    p.add_argument("--max-micro-batch", type=int, default=8, help="throughput search (8)")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = p.parse_args()
    if args.budget <= 0 or args.max_micro_batch < 1:
        fail("--budget must be > 0 and --max-micro-batch >= 1")
    problems = check_bundle(args.bundle)
    if problems:
        fail(f"bundle {args.bundle}: {'; '.join(problems)}")
    plan = steps(args.bundle, args.out, args.max_micro_batch)
    if args.dry_run:
        for name, cmd in plan:
            print(f"{name}: {' '.join(cmd)}")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget
    summary = []
    for name, cmd in plan:
        left = deadline - time.monotonic()
        if left <= 0:
            summary.append((name, "not run: out of time", 0.0))
            continue
        start = time.monotonic()
        print(f"== {name}", flush=True)
        try:
            rc = subprocess.run(cmd, cwd=ROOT, timeout=left).returncode
            status = "passed" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = "stopped: out of time"
        summary.append((name, status, time.monotonic() - start))
        if name in ("install", "imports") and status != "passed":
            break
    print("\n| step | result | seconds |\n|---|---|---|")
    for name, status, seconds in summary:
        print(f"| {name} | {status} | {seconds:.0f} |")
    if len(summary) < len(plan) or any(s != "passed" for _, s, _ in summary):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
