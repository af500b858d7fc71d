"""The README's demo, end to end on a smaller budget: stdlib corpus -> tokenizer -> shards ->
2-process pretraining of an n=4 model -> report. Also the regression guard that the loss of
every head falls on real data."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.slow  # the whole path: data prep and a 2-process training


def test_demo_runs_and_every_head_learns(tmp_path):
    work = tmp_path / "demo"
    cmd = [
        sys.executable, "-m", "mtp_dist.demo", "--workdir", str(work), "--corpus-mb", "3",
        "--vocab-size", "2000", "train.steps=16", "train.warmup_steps=4",
        "train.eval_interval=8", "checkpoint.interval=8", "model.seq_length=128",
        "logging.wandb_mode=offline",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR")}
    env.update(PYTHONWARNINGS="ignore", WANDB_SILENT="true")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    shards = json.loads((work / "shards" / "manifest.json").read_text())
    assert shards["totals"]["shards"] == 4, "2 workers tokenize the 4 corpus files"
    run = work / "run"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0]["head_losses"], records[-1]["head_losses"]
    for i, (a, b) in enumerate(zip(first, last, strict=True)):
        assert b < a - 1.0, f"head {i + 1} did not learn: {a:.2f} -> {b:.2f}"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000016"
    assert (run / "losses.png").stat().st_size > 10_000
    assert "run directory" in proc.stdout
    assert list((run / "wandb").glob("offline-run-*")), "wandb logs offline by default"
