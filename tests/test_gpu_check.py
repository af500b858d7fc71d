"""The GPU check's scripts (benchmarks/gpu/), on CPU: their help and bad-input errors, the
bundle check on folders of stand-in wheel files (names and sizes are what it checks; the real
wheels come from prepare.py where the registries are reachable), run.py's plan, and the
throughput benchmark end to end on the tiny shape."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support import ROOT

sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))

import prepare  # noqa: E402


def run(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"benchmarks/gpu/{script}", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


@pytest.mark.parametrize("script", ["prepare.py", "run.py", "throughput.py"])
def test_help(script):
    proc = run(script, "--help")
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: {script}")


def stand_in_bundle(folder, **versions):
    """Empty files named as prepare.py's wheels would be (versions overridable)."""
    folder.mkdir()
    wanted = {**{k: v for k, v in prepare.required().items() if v}, **versions}
    for name, version in wanted.items():
        tag = "cp312-cp312-manylinux_2_17_x86_64" if name == "pydantic-core" else "py3-none-any"
        (folder / f"{name.replace('-', '_')}-{version}-{tag}.whl").write_bytes(b"")
    (folder / "mtp_dist-0.1.0-py3-none-any.whl").write_bytes(b"")
    return folder


def test_a_complete_bundle_passes(tmp_path):
    assert prepare.check_bundle(stand_in_bundle(tmp_path / "b")) == []


def test_bundle_problems_are_named(tmp_path):
    assert "holds no wheels" in prepare.check_bundle(tmp_path / "missing")[0]
    b = stand_in_bundle(tmp_path / "b", **{"megatron-core": "0.19.0"})
    (b / "ninja-1.13.2-py3-none-win_amd64.whl").write_bytes(b"")
    with open(b / "deepspeed-0.19.8-py3-none-any.whl", "wb") as f:
        f.truncate(61 * 10**6)  # sparse: the size is what counts
    problems = " | ".join(prepare.check_bundle(b))
    assert "megatron-core: version 0.19.0, need 0.16.1" in problems
    assert "ninja: 2 wheels" in problems and "not installable by CPython 3.12" in problems
    assert "over the 60 MB limit" in problems


def test_a_changed_wheel_is_caught_by_the_manifest(tmp_path):
    b = stand_in_bundle(tmp_path / "b")
    wheels = {w.name: {"sha256": prepare.sha256(w)} for w in b.glob("*.whl")}
    (b / prepare.MANIFEST).write_text(json.dumps({"wheels": wheels}))
    assert prepare.check_bundle(b) == []
    (b / "hjson-3.1.0-py3-none-any.whl").write_bytes(b"changed")
    assert prepare.check_bundle(b) == [
        "hjson-3.1.0-py3-none-any.whl: not as the manifest records it"
    ]


def test_run_plans_install_tests_and_benchmark(tmp_path):
    b = stand_in_bundle(tmp_path / "b")
    proc = run("run.py", "--bundle", str(b), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    names = [line.split(":")[0] for line in proc.stdout.splitlines()]
    assert names == ["install", "imports", "pytest -m gpu", "throughput"]
    assert "--no-index" in proc.stdout and "-m gpu" in proc.stdout


@pytest.mark.parametrize(
    "script,args,message",
    [
        ("run.py", ["--bundle", "/nonexistent"], "error: bundle /nonexistent: /nonexistent holds"),
        ("run.py", ["--budget", "0"], "error: --budget must be > 0"),
        ("prepare.py", ["--dest", "README.md"], "error: --dest README.md is a file"),
        ("prepare.py", ["--dest", "benchmarks"], "error: --dest benchmarks is not empty"),
        ("throughput.py", ["--shapes", "7b"], "error: unknown shape '7b'"),
        ("throughput.py", ["--steps", "0"], "error: --steps must be >= 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(script, args, message):
    proc = run(script, *args)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith(message)


@pytest.mark.slow
def test_throughput_on_the_tiny_shape(tmp_path):
    """Every case measured at the largest micro batch n=1 fits (the search: 2 fits on CPU), the
    MFU and the derived ratios those of the rows."""
    out = tmp_path / "t.json"
    proc = run("throughput.py", "--tiny", "--max-micro-batch", "2", "--steps", "1",
               "--warmup", "0", "--out", str(out), timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    rows = {x["case"]: x for x in r["rows"]}
    assert set(rows) == {"n1", "n4_seq", "n4_joint", "n1_megatron", "hf_llama"}
    assert {x["micro_batch"] for x in rows.values()} == {2}
    n1 = rows["n1"]
    assert n1["mfu_measured"] == pytest.approx(n1["model_flops_per_s"] / r["matmul_flops"])
    d = r["derived"]["tiny"]
    assert d["ours_tokens_over_hf"] == pytest.approx(
        n1["tokens_per_s"] / rows["hf_llama"]["tokens_per_s"]
    )
    assert rows["hf_llama"]["flops_per_token"] == n1["flops_per_token"]
