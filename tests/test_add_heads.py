"""Heads on an existing model, end to end (megatron engine, CPU/gloo, synthetic data): an n=1
model gets three more heads (model.init_from) that train alone (train.trainable=heads) on two
data-parallel ranks under a decaying loss weight, stop at a checkpoint and resume; the result
is exported and decoded. Everything but heads 2..4 stays the source's bit for bit, greedy
decoding gives the source's tokens, the optimizer holds state for heads 2..4 only, and a resume
that changes the settings is refused by name. (Gradients and losses against the full run:
tests/test_heads.py, tests/test_model_parallel.py; DeepSpeed: tests/test_deepspeed.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from mtp_dist import config, sources
from mtp_dist.checkpointing import CheckpointError, read_meta, write_consolidated
from mtp_dist.export import export
from mtp_dist.inference.decode import Decoder
from mtp_dist.model.model import build_model
from mtp_dist.model.weights import full_state, init_weights
from mtp_dist.preflight import SYNTHETIC, _continued
from tests.support import losses
from tests.test_errors import assert_user_error, run
from tests.test_trainer import train

pytestmark = pytest.mark.slow  # subprocess trainings

WEIGHTS = ["model.head_loss_weights=[1, 0.5, 0.5, 0.5]",
           "model.head_loss_weights_end=[1, 0.2, 0.2, 0.2]"]  # fmt: skip
EXTRA = ("heads.layers.1.", "heads.layers.2.", "heads.layers.3.")


def heads_only(source, *more: str) -> list[str]:
    return [f"model.init_from={source}", "train.trainable=heads", "train.lr_decay_steps=4",
            "checkpoint.interval=0", *WEIGHTS, *more]  # fmt: skip


@pytest.fixture(scope="module")
def added(tmp_path_factory, megatron_1proc):
    root = tmp_path_factory.mktemp("add_heads")
    # The existing model: tiny.yaml at n=1, written as an export here (a training of its own
    # would only cost a process start).
    cfg = config.load("configs/tiny.yaml", ["model.n_future_tokens=1"])
    model = build_model(cfg.model)
    init_weights(model, seed=5)
    source = write_consolidated(root / "n1.pt", full_state(model), cfg.to_dict(), 0, None)
    run_dir = root / "heads"
    train(2, run_dir, *heads_only(source, "train.steps=2"))
    proc = train(2, run_dir, *heads_only(source, "train.steps=4"))
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    return source, run_dir


def test_resume_that_changes_what_trains_is_refused(added):
    source, run_dir = added
    tiny = ["--config", "configs/tiny.yaml", "data.synthetic=true", f"run.dir={run_dir}"]
    args = [*heads_only(source, "train.steps=6"), "train.trainable=all"]
    proc = run("mtp_dist.train", "--check", "--world-size", "2", *tiny, *args)
    assert_user_error(proc, "train.trainable='all'", "trained with 'heads'", "must keep it")
    # The weights' schedule likewise (the same check, in this process).
    checkpoint = run_dir / "checkpoints" / "step_00000004"
    changed = config.load(
        "configs/tiny.yaml",
        [
            *tiny[3:],
            *heads_only(source, "train.steps=6"),
            "model.head_loss_weights_end=[1, 0.1, 0.1, 0.1]",
        ],
    )
    with pytest.raises(CheckpointError, match=r"model.head_loss_weights_end=\[1.0, 0.1, 0.1"):
        _continued(changed, read_meta(checkpoint), checkpoint, SYNTHETIC)  # fmt: skip


def test_weights_follow_the_schedule_and_are_recorded(added):
    _, run_dir = added
    records = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        records[r["step"]] = r
    # 0.5 -> 0.2 over the decay horizon of 4 steps: steps 1..4, across the resume after step 2.
    for step, w in zip(range(1, 5), (0.5, 0.4, 0.3, 0.2), strict=True):
        assert records[step]["head_loss_weights"] == pytest.approx([1.0, w, w, w], abs=1e-12)
        r = records[step]
        total = sum(a * b for a, b in zip(r["head_loss_weights"], r["head_losses"], strict=True))
        assert r["loss"] == pytest.approx(total, rel=1e-6)
    meta = json.loads((run_dir / "checkpoints" / "step_00000004" / "meta.json").read_text())
    assert meta["trainable"] == meta["config"]["train"]["trainable"] == "heads"
    assert meta["head_loss_weights"] == pytest.approx([1.0, 0.2, 0.2, 0.2])
    assert meta["config"]["model"]["head_loss_weights_end"] == [1.0, 0.2, 0.2, 0.2]
    assert sorted(losses(run_dir)) == [1, 2, 3, 4]


def test_optimizer_holds_state_for_heads_2_to_n_only(added):
    _, run_dir = added
    engine = run_dir / "checkpoints" / "step_00000004" / "engine"
    keys = FileSystemReader(str(engine)).read_metadata().state_dict_metadata
    state = [k.split(".", 3)[3] for k in keys if k.startswith("optimizer.state.exp_avg_sq.")]
    assert state and all(k.startswith(EXTRA) for k in state), state
    assert {k.split(".")[2] for k in state} == {"1", "2", "3"}


def test_frozen_tensors_and_greedy_tokens_stay_the_sources(added, megatron_1proc, tmp_path):
    source, run_dir = added
    before = sources.open_source(source).full_state()
    exported = export(run_dir, tmp_path / "heads.pt")
    after = sources.open_source(exported).full_state()
    assert set(before) < set(after)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), f"{name} changed"
    for name in after:
        if name.startswith(EXTRA):  # started as copies of head 1, then trained
            head1 = before["heads.layers.0." + name.split(".", 3)[3]]
            assert not torch.equal(after[name], head1), f"{name} did not train"
    prompts = [[5, 17, 3, 99, 42, 7], [300, 2, 2, 81]]
    tokens = {}
    for key, path in (("n1", source), ("heads", exported)):
        src = sources.open_source(path)
        model = build_model(src.model)
        src.load_into(model)
        model.eval()
        decoder = Decoder(model, src.model.vocab_size)
        tokens[key] = [g.tokens for g in decoder.generate(prompts, 24, k=1)]
        if key == "heads":
            tokens["speculative"] = [g.tokens for g in decoder.generate(prompts, 24, k=4)]
    assert tokens["heads"] == tokens["n1"] == tokens["speculative"]
