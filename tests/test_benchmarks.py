"""Every benchmark script parses its arguments and says what it does (they are run by hand, so
an import or argument slip would otherwise show only when someone measures)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support import ROOT

SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("[!_]*.py"))  # _*.py: helpers


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_help(script):
    proc = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: {script}")


def test_every_benchmark_is_listed():
    assert len(SCRIPTS) >= 7


def test_attention_benchmark_on_a_tiny_shape(tmp_path):
    """benchmarks/attention.py end to end on a small step: both attentions measured in one run
    from the same weights (the same first loss), the ratios those of the rows."""
    out = tmp_path / "attention.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/attention.py", "--seq", "64", "--micro-batch", "2",
         "--rounds", "2", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| sdpa |" in proc.stdout and "| megatron |" in proc.stdout
    r = json.loads(out.read_text())
    sdpa, ref = r["rows"]["sdpa"], r["rows"]["megatron"]
    assert len(sdpa["seconds"]) == len(ref["seconds"]) == 2
    assert sdpa["losses"][0] == pytest.approx(ref["losses"][0], rel=1e-5)
    assert r["ratios"]["time"] == pytest.approx(sdpa["step_s"] / ref["step_s"])
    assert r["ratios"]["peak"] == pytest.approx(sdpa["peak_mib"] / ref["peak_mib"])
    assert min(sdpa["peaks_mib"] + ref["peaks_mib"]) > 0


def test_attention_benchmark_bad_input():
    proc = subprocess.run(
        [sys.executable, "benchmarks/attention.py", "--seq", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --seq must be >= 1"
