"""The GPU path (NCCL, bf16, CUDA kernels): `pytest -m gpu` selects these; without a CUDA device
they skip with the reason. Each writes only under pytest's tmp_path, never into tracked files.

Tolerances are stated where they are set; bf16 has 8 mantissa bits (~4e-3 relative per
rounding)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support import ROOT, losses

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA device (NCCL, bf16, CUDA allocator); this machine has none",
    ),
]

TINY = ["--config", "configs/tiny.yaml", "data.synthetic=true", "logging.wandb=false"]
BF16_TRACK_RTOL = 2e-2
"""A bf16 run's loss against the fp32 run's, step by step over 20 steps of the tiny model."""
SDPA_BF16_RTOL = 2e-2
"""sdpa against megatron-core's attention in bf16: loss, and each gradient to this fraction of
its largest entry (different kernels round the softmax differently)."""


def train(run_dir: Path, *overrides: str, nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    cmd = [*launcher, "-m", "mtp_dist.train", *TINY, f"run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_bf16_training_learns_and_tracks_fp32(tmp_path):
    steps = ["train.steps=20", "checkpoint.interval=0"]
    train(tmp_path / "bf16", "train.dtype=bf16", *steps)
    train(tmp_path / "fp32", "train.dtype=fp32", *steps)
    bf16, fp32 = losses(tmp_path / "bf16"), losses(tmp_path / "fp32")
    assert bf16[20] < bf16[1]
    for step, loss in fp32.items():
        assert bf16[step] == pytest.approx(loss, rel=BF16_TRACK_RTOL), step


def test_sequential_heads_peak_memory_at_32k_vocabulary(tmp_path):
    """The paper's O(V+d) claim on the device (CUDA allocator statistics): n=4 sequential
    within 1.05x of n=1 at V=32k; joint far above."""
    out = tmp_path / "head_memory.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/head_memory.py", "--vocab", "32000", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {r["device"] for r in result["rows"]} == {"cuda"}
    ratio = {r["case"]: r["ratio_to_n1"] for r in result["rows"]}
    assert ratio["n4_seq"] <= 1.05 and ratio["n4_joint"] > 2.0, ratio


def test_checkpoint_resumes_bit_exactly(tmp_path):
    """Steps 3-4 resumed from step 2's checkpoint equal the uninterrupted run's exactly."""
    common = ["train.steps=4", "checkpoint.interval=2", "checkpoint.keep=4"]
    train(tmp_path / "whole", *common)
    start = tmp_path / "whole" / "checkpoints" / "step_00000002"
    train(tmp_path / "resumed", *common, f"train.resume={start}")
    whole, resumed = losses(tmp_path / "whole"), losses(tmp_path / "resumed")
    assert sorted(resumed) == [3, 4]
    assert all(resumed[s] == whole[s] for s in resumed), (resumed, whole)


def test_speculative_decoding_equals_greedy_fp32(tmp_path):
    train(tmp_path, "data.tokenizer=byte", "model.vocab_size=259", "train.steps=4",
          "train.dtype=fp32")  # fmt: skip
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


def test_deepspeed_zero2_trains(tmp_path):
    """engine=deepspeed, ZeRO-2, bf16: DeepSpeed's FusedAdam, its op JIT-built on first use
    (the machine needs the CUDA compiler and ninja; the engine has no fallback to torch's AdamW
    yet, so a failed build fails this test with DeepSpeed's message); the loss goes down."""
    proc = train(tmp_path, "engine=deepspeed", "deepspeed.zero_stage=2", "train.dtype=bf16",
                 "train.steps=20", "checkpoint.interval=0")  # fmt: skip
    got = losses(tmp_path)
    assert got[20] < got[1]
    print(proc.stdout[-2000:])  # which Adam DeepSpeed used, for the record (pytest -s)


def test_sdpa_equals_megatron_attention_in_bf16(megatron_1proc):
    from mtp_dist.config import ModelConfig
    from mtp_dist.model.model import build_model
    from mtp_dist.model.weights import init_weights

    results = {}
    for attention in ("sdpa", "megatron"):
        cfg = ModelConfig(n_future_tokens=4, num_layers=2, hidden_size=256,
                          num_attention_heads=8, num_query_groups=4, vocab_size=1000,
                          vocab_multiple=128, seq_length=512, attention=attention)  # fmt: skip
        model = build_model(cfg, dtype=torch.bfloat16, device="cuda")
        init_weights(model, seed=3)
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, 1000, (4, 516), generator=gen).cuda()
        out = model(tokens)
        out.loss.backward()
        grads = {k: p.grad.float() for k, p in model.named_parameters()}
        results[attention] = (out.loss.item(), grads)
    (loss, grads), (ref_loss, ref_grads) = results["sdpa"], results["megatron"]
    assert loss == pytest.approx(ref_loss, rel=SDPA_BF16_RTOL)
    for name, g in grads.items():
        bound = SDPA_BF16_RTOL * ref_grads[name].abs().max().item()
        assert (g - ref_grads[name]).abs().max().item() <= bound, name
