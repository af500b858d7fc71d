"""The Hugging Face format across layouts and engines (torchrun, CPU/gloo): a TP2 x PP2 checkpoint
exports to a Llama that computes our head 1's logits; a Llama directory imports into a TP2 x PP2
run (heads added) and a checkpoint into a DeepSpeed ZeRO-3 run (heads dropped), and each run's
checkpoint converts back to the same Llama tensors (read in this process: the export's own
path, model/hf.to_llama of the checkpoint's full state, without another launch)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mtp_dist.distributed import free_port
from mtp_dist.model import hf
from tests.support import ROOT
from tests.test_hf import LOGITS_ATOL, head1_logits, llama

pytestmark = pytest.mark.slow  # torchrun trainings

MODEL = [
    "model.n_future_tokens=2",
    "model.num_query_groups=2",
    "model.vocab_size=500",  # padded to 512
    "model.init_std=0.1",
]


def env() -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR")}
    return {**base, "OMP_NUM_THREADS": "1"}


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def train(nproc: int, run_dir: Path, *overrides: str) -> Path:
    args = ["-m", "mtp_dist.train", "--config", "configs/tiny.yaml", f"run.dir={run_dir}",
            "data.synthetic=true", "logging.wandb=false", *MODEL, *overrides]  # fmt: skip
    launcher = ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                f"--master-port={free_port()}"]  # fmt: skip
    run([sys.executable, *launcher, *args])
    return run_dir


def export_hf(source: Path, out: Path) -> Path:
    run([sys.executable, "-m", "mtp_dist.export", str(source), str(out), "--format", "hf"])
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(run directory, its HF export): TP2 x PP2, two steps."""
    root = tmp_path_factory.mktemp("hf_layouts")
    run_dir = train(4, root / "tp2pp2", "parallel.tensor=2", "parallel.pipeline=2",
                    "train.steps=2", "train.warmup_steps=1")  # fmt: skip
    return run_dir, export_hf(run_dir, root / "tp2pp2_hf")


def checkpoint_model(run_dir: Path):
    """The run's latest checkpoint in a TP1 model (in megatron_1proc's world)."""
    from mtp_dist.model.model import build_model
    from mtp_dist.sources import open_source

    source = open_source(run_dir)
    model = build_model(source.model)
    source.load_into(model)
    return model.eval()


def as_llama(run_dir: Path) -> tuple[dict, dict]:
    """What `export --format hf` writes of the run's checkpoint: (Llama, extra-head) tensors."""
    from mtp_dist.model.weights import full_state

    model = checkpoint_model(run_dir)
    return hf.to_llama(full_state(model), model.model_cfg)


def test_a_tp2pp2_checkpoint_exports_to_our_head_1s_logits(trained, megatron_1proc):
    run_dir, exported = trained
    model = checkpoint_model(run_dir)
    tokens = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = llama(exported)(tokens).logits
    torch.testing.assert_close(theirs, head1_logits(model, tokens, 500), rtol=0, atol=LOGITS_ATOL)


def test_import_into_tp2pp2_with_a_head_more_exports_the_same_tensors(
    trained, tmp_path, megatron_1proc
):
    _, exported = trained
    run_dir = train(4, tmp_path / "run", "parallel.tensor=2", "parallel.pipeline=2",
                    "train.steps=0", "model.n_future_tokens=3",
                    f"model.init_from={exported}")  # fmt: skip
    assert (run_dir / "checkpoints" / "step_00000000").is_dir()
    after, heads_after = as_llama(run_dir)
    before = load_file(exported / hf.WEIGHTS)
    assert set(before) == set(after)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    heads_before = load_file(exported / hf.HEADS_WEIGHTS)
    assert {k.split(".")[1] for k in heads_after} == {"2", "3"}
    for k, v in heads_after.items():
        # Head 2 as trained; head 3 a copy of head 1 (Llama layer num_layers = 2).
        same = heads_before[k] if k.startswith("heads.2.") else before[f"model.layers.2.{k[8:]}"]
        assert torch.equal(v, same), k


def test_deepspeed_zero3_starts_from_a_megatron_checkpoint_with_fewer_heads(
    trained, tmp_path, megatron_1proc
):
    """n=2 -> n=1 from the TP2 x PP2 checkpoint itself: a plain Llama, the same tensors."""
    source, exported = trained
    run_dir = train(2, tmp_path / "run", "engine=deepspeed", "deepspeed.zero_stage=3",
                    "train.steps=0", "model.n_future_tokens=1",
                    f"model.init_from={source}")  # fmt: skip
    after, heads_after = as_llama(run_dir)
    assert heads_after == {}
    before = load_file(exported / hf.WEIGHTS)
    assert set(before) == set(after)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
