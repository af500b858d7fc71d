"""Step 1 of the GPU check, run where the package registries are reachable: every wheel that a
GPU machine with Python 3.12 and a CUDA build of PyTorch lacks, into one folder (ignored by
git), under 60 MB.

The GPU machine's image has torch, transformers, safetensors, sentencepiece, tokenizers, numpy,
pyarrow, pyyaml, tqdm, psutil and pytest (../shared/notes/gpu-machine.md); it lacks
megatron-core, DeepSpeed and their dependencies below. Binary wheels are downloaded for
CPython 3.12 on manylinux x86_64 (pip download --only-binary, --no-deps: the set is complete by
construction, and nothing else is pulled in); DeepSpeed has only a source release, so it is built
here as a pure-Python wheel without its ops (DS_BUILD_OPS=0; they JIT-compile on first use
there). The project itself goes in as a wheel too. The versions are the ones this project's
suite ran. A manifest (name, version, bytes, sha256 of every wheel) is written last; run.py
checks the folder against it.

    python benchmarks/gpu/prepare.py                 # -> benchmarks/gpu/bundle/
    python benchmarks/gpu/prepare.py --dest /tmp/bundle
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "benchmarks" / "gpu" / "bundle"
LIMIT_BYTES = 60 * 10**6
BINARY = {
    "megatron-core": "0.16.1",
    "pydantic": "2.14.4",
    "pydantic-core": "2.50.5",
    "annotated-types": "0.8.0",
    "typing-inspection": "0.4.5",
    "typing-extensions": "4.16.0",
    "hjson": "3.1.0",
    "msgpack": "1.2.4",
    "ninja": "1.13.2",
    "py-cpuinfo": "9.0.0",
    "einops": "0.8.2",
}
"""Wheels downloaded as they are (DeepSpeed's and megatron-core's dependencies missing there)."""
SOURCE = {"deepspeed": "0.19.8"}
"""Built here from the source release, without ops."""
PROJECT = "mtp-dist"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
MANIFEST = "manifest.json"


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(path: Path) -> tuple[str, str]:
    """(normalised distribution name, version) of a wheel file name."""
    parts = path.name.split("-")
    return normalise(parts[0]), parts[1]


def required() -> dict[str, str | None]:
    """Every distribution the bundle must hold, with its version (the project's: any)."""
    return {**{normalise(k): v for k, v in {**BINARY, **SOURCE}.items()}, PROJECT: None}


def check_bundle(folder: Path) -> list[str]:
    """What is wrong with a bundle folder (empty: nothing): every required wheel exactly once at
    its version, only wheels CPython 3.12 on x86_64 Linux can install, under the size limit,
    and, if a manifest is there, every file as it records."""
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    if not wheels:
        return [f"{folder} holds no wheels: run benchmarks/gpu/prepare.py where the registries "
                "are reachable"]  # fmt: skip
    problems = []
    found: dict[str, list[str]] = {}
    for w in wheels:
        name, version = wheel_name(w)
        found.setdefault(name, []).append(version)
        tags = w.stem.split("-")[-3:]
        if tags[0] not in ("py3", "cp312", "py2.py3") or not (
            tags[2] == "any" or tags[2].endswith("x86_64")
        ):
            problems.append(f"{w.name}: not installable by CPython 3.12 on x86_64 Linux")
    for name, version in required().items():
        got = found.get(name, [])
        if len(got) != 1:
            problems.append(f"{name}: {len(got)} wheels, need exactly one")
        elif version is not None and got[0] != version:
            problems.append(f"{name}: version {got[0]}, need {version}")
    extra = sorted(set(found) - set(required()))
    if extra:
        problems.append(f"unexpected wheels: {', '.join(extra)}")
    total = sum(w.stat().st_size for w in wheels)
    if total > LIMIT_BYTES:
        problems.append(f"{total / 1e6:.1f} MB, over the {LIMIT_BYTES / 1e6:.0f} MB limit")
    manifest = folder / MANIFEST
    if manifest.exists():
        recorded = json.loads(manifest.read_text())["wheels"]
        for w in wheels:
            entry = recorded.get(w.name)
            if entry is None or entry["sha256"] != sha256(w):
                problems.append(f"{w.name}: not as the manifest records it")
    return problems


def fail(message: str, status: int = 2) -> None:
    """One line on stderr and the exit status: 2 for bad input, 1 for a failed step."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(status)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pip(*args: str, env: dict | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        fail(f"{' '.join(cmd[2:5])} ... failed: {tail[0]}", status=1)


def prepare(dest: Path) -> None:
    platforms = [x for p in PLATFORMS for x in ("--platform", p)]
    for name, version in BINARY.items():
        pip("download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
            "--implementation", "cp", *platforms, "--dest", str(dest),
            f"{name}=={version}")  # fmt: skip
    env = {**os.environ, "DS_BUILD_OPS": "0"}
    for name, version in SOURCE.items():
        pip("wheel", "--no-deps", "--wheel-dir", str(dest), f"{name}=={version}", env=env)
    pip("wheel", "--no-deps", "--wheel-dir", str(dest), str(ROOT))
    wheels = {w.name: {"name": wheel_name(w)[0], "version": wheel_name(w)[1],
                       "bytes": w.stat().st_size, "sha256": sha256(w)}
              for w in sorted(dest.glob("*.whl"))}  # fmt: skip
    (dest / MANIFEST).write_text(json.dumps({"wheels": wheels}, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dest", type=Path, default=BUNDLE, help="the bundle folder (created)")
    p.add_argument("--check", action="store_true", help="only check an existing bundle")
    args = p.parse_args()
    if args.dest.exists() and not args.dest.is_dir():
        fail(f"--dest {args.dest} is a file; give a folder")
    if not args.check:
        if args.dest.is_dir() and any(args.dest.iterdir()):
            fail(f"--dest {args.dest} is not empty; remove it or give another")
        args.dest.mkdir(parents=True, exist_ok=True)
        prepare(args.dest)
    problems = check_bundle(args.dest)
    if problems:
        fail(f"bundle {args.dest}: {'; '.join(problems)}")
    total = sum(w.stat().st_size for w in args.dest.glob("*.whl"))
    print(f"bundle {args.dest}: {len(required())} wheels, {total / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
