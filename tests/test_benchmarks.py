"""Every benchmark script parses its arguments and says what it does (they are run by hand, so
an import or argument slip would otherwise show only when someone measures)."""

from __future__ import annotations

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
