"""The GPU path (NCCL, bf16, megatron-core's fused kernels): run where a GPU exists."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.support import ROOT

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (NCCL, bf16); this machine has none"
)


def test_bf16_training_on_gpu_learns(tmp_path):
    nproc = min(2, torch.cuda.device_count())
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "-m",
           "mtp_dist.train", "--config", "configs/tiny.yaml", f"run.dir={tmp_path}",
           "train.dtype=bf16", "train.steps=20"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < records[0]["loss"]


def test_sequential_heads_peak_memory_on_gpu():
    """The paper's O(V+d) claim on the device: n=4 sequential stays near n=1, joint does not."""
    proc = subprocess.run([sys.executable, "benchmarks/head_memory.py"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((ROOT / "benchmarks/results/head_memory.json").read_text())
    ratio = {r["case"]: r["ratio_to_n1"] for r in result["rows"]}
    assert ratio["n4_seq"] < 1.15 and ratio["n4_joint"] > 2.0


def test_generation_on_gpu_speculative_equals_greedy(tmp_path):
    """generate on the GPU (fp32): the speculative tokens are greedy's."""
    cmd = [sys.executable, "-m", "mtp_dist.train", "--config", "configs/tiny.yaml",
           f"run.dir={tmp_path}", "data.synthetic=true", "data.tokenizer=byte",
           "model.vocab_size=259", "train.steps=4", "logging.wandb=false"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = []
    for extra in ([], ["--speculative", "4"]):
        proc = subprocess.run(
            [sys.executable, "-m", "mtp_dist.generate", str(tmp_path), "--prompt", "def f(x):",
             "--max-new-tokens", "24", "--json", *extra],
            cwd=ROOT, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs.append(json.loads(proc.stdout.splitlines()[-1])["tokens"])
    assert outputs[0] == outputs[1] and len(outputs[0]) > 0
