"""The trainer end to end (megatron engine, CPU/gloo, synthetic data): exact resume after a
kill -9, resharding TP2xPP2 <-> TP1xPP1, SIGTERM, a kill during a checkpoint write, and the
errors that must come before any compute."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtp_dist.distributed import free_port
from tests.support import ROOT, kill_tree, losses

pytestmark = pytest.mark.slow  # torchrun / subprocess trainings

STEPS = 8
BASE = [
    "data.synthetic=true",
    f"train.steps={STEPS}",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.warmup_steps=2",
    "checkpoint.interval=2",
    "checkpoint.keep=10",
    "logging.wandb=false",
]
RESHARD_RTOL = 1e-5


def train_cmd(nproc: int, run_dir: Path, *overrides: str) -> list[str]:
    args = ["--config", "configs/tiny.yaml", f"run.dir={run_dir}", *BASE, *overrides]
    if nproc == 1:
        return [sys.executable, "-m", "mtp_dist.train", *args]
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}", "-m", "mtp_dist.train", *args,
    ]  # fmt: skip


def env() -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR")}
    return {**base, "OMP_NUM_THREADS": "1"}


def train(
    nproc: int, run_dir: Path, *overrides: str, expect: int = 0
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        train_cmd(nproc, run_dir, *overrides), cwd=ROOT, env=env(), capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        assert proc.poll() is None, "the run ended before the event the test waits for"
        time.sleep(0.005)
    raise TimeoutError


def steps_logged_since(run_dir: Path, lines_before: int) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()[lines_before:]
    return [json.loads(line)["step"] for line in lines]


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("ref")
    train(1, run)
    return run


@pytest.fixture(scope="module")
def tp2pp2(tmp_path_factory):
    run = tmp_path_factory.mktemp("tp2pp2")
    train(4, run, "parallel.tensor=2", "parallel.pipeline=2")
    return run


@pytest.fixture(scope="module")
def dp2(tmp_path_factory):
    run = tmp_path_factory.mktemp("dp2")
    train(2, run)
    return run


def test_reference_run_checkpoints_and_learns(reference):
    ckpts = sorted(p.name for p in (reference / "checkpoints").glob("step_*"))
    assert ckpts == [f"step_{s:08d}" for s in (2, 4, 6, 8)]
    assert (reference / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    record = json.loads((reference / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("step", "loss", "head_losses", "lr", "grad_norm", "tokens_per_s", "mfu"):
        assert key in record
    assert len(record["head_losses"]) == 4
    assert (reference / "config.yaml").is_file()


def test_tp2pp2_matches_single_process(reference, tp2pp2):
    ref, got = losses(reference), losses(tp2pp2)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=RESHARD_RTOL)


def _kill_and_resume(nproc: int, run: Path, reference_losses: dict, *layout: str) -> None:
    proc = subprocess.Popen(
        train_cmd(nproc, run, *layout), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(lambda: logged_steps(run) >= 5, proc)
    finally:
        kill_tree(proc.pid)  # kill -9 the launcher and every rank
        proc.wait()
    before = logged_steps(run)
    assert 5 <= before < STEPS, "the kill must land between checkpoints"
    latest = (run / "checkpoints" / "latest").read_text().strip()
    saved = int(latest.removeprefix("step_"))
    proc = train(nproc, run, *layout)  # train.resume=auto: from the last checkpoint
    assert f"resumed from {run / 'checkpoints' / latest} at step {saved}" in proc.stdout
    # The resumed run logged exactly the steps after its checkpoint: it did not restart.
    assert steps_logged_since(run, before) == list(range(saved + 1, STEPS + 1))
    got = losses(run)
    for step in range(1, STEPS + 1):
        assert got[step] == reference_losses[step], f"step {step} differs after resume"


def test_dp2_matches_single_process(reference, dp2):
    ref, got = losses(reference), losses(dp2)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=RESHARD_RTOL)


def test_kill9_then_resume_is_exact_dp2(dp2, tmp_path):
    _kill_and_resume(2, tmp_path / "run", losses(dp2))


def test_kill9_then_resume_is_exact_tp1pp1(reference, tmp_path):
    _kill_and_resume(1, tmp_path / "run", losses(reference))


def test_kill9_then_resume_is_exact_tp2pp2(tp2pp2, tmp_path):
    _kill_and_resume(
        4, tmp_path / "run", losses(tp2pp2), "parallel.tensor=2", "parallel.pipeline=2"
    )


def _continues(reference: Path, start: Path, run: Path, nproc: int, *layout: str) -> None:
    """A checkpoint of step 4 continues at another layout: steps 5.. only, same losses."""
    train(nproc, run, f"train.resume={start}", *layout)
    assert steps_logged_since(run, 0) == list(range(5, STEPS + 1))
    got, ref = losses(run), losses(reference)
    for step in range(5, STEPS + 1):
        assert got[step] == pytest.approx(ref[step], rel=RESHARD_RTOL)


def test_tp2pp2_checkpoint_continues_at_tp1pp1(reference, tp2pp2, tmp_path):
    _continues(reference, tp2pp2 / "checkpoints" / "step_00000004", tmp_path, 1)


def test_tp1pp1_checkpoint_continues_at_tp2pp2(reference, tmp_path):
    start = reference / "checkpoints" / "step_00000004"
    _continues(reference, start, tmp_path, 4, "parallel.tensor=2", "parallel.pipeline=2")


def test_sdpa_checkpoint_continues_under_megatron_attention(reference, tmp_path):
    """model.attention has no parameters: the reference's (sdpa) checkpoint continues under
    megatron-core's attention with the same losses (fp32, to RESHARD_RTOL)."""
    start = reference / "checkpoints" / "step_00000004"
    _continues(reference, start, tmp_path, 1, "model.attention=megatron")
    assert "attention: megatron" in (tmp_path / "config.yaml").read_text()


def test_dp2_checkpoint_continues_at_dp1(reference, dp2, tmp_path):
    """The distributed optimizer's state, sharded over 2 data-parallel ranks, reshards to 1."""
    _continues(reference, dp2 / "checkpoints" / "step_00000004", tmp_path, 1)


def test_tied_embeddings_train_alike_with_a_pipeline(tmp_path):
    """model.tie_embeddings: one process and PP2 (where the last stage keeps a copy of the
    embedding that megatron-core keeps equal) give the same losses, and the model learns."""
    tied = ["model.tie_embeddings=true"]
    train(1, tmp_path / "one", *tied)
    train(2, tmp_path / "pp2", *tied, "parallel.pipeline=2")
    one, pp2 = losses(tmp_path / "one"), losses(tmp_path / "pp2")
    assert sorted(one) == sorted(pp2) == list(range(1, STEPS + 1))
    for step in one:
        assert pp2[step] == pytest.approx(one[step], rel=RESHARD_RTOL)
    assert one[STEPS] < one[1] - 0.2


@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT], ids=["TERM", "USR1", "INT"]
)
def test_signal_saves_and_exits_zero(tmp_path, sig):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        train_cmd(1, run, "train.steps=1000", "checkpoint.interval=0"), cwd=ROOT, env=env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for(lambda: logged_steps(run) >= 2, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)  # the grace period
    assert proc.returncode == 0, err[-2000:]
    assert f"received {signal.Signals(sig).name}" in out
    latest = (run / "checkpoints" / "latest").read_text().strip()
    step = int(latest.split("_")[1])
    assert 2 <= step < 1000 and (run / "checkpoints" / latest / "meta.json").is_file()


def test_kill_during_checkpoint_write_keeps_previous(tmp_path):
    run = tmp_path / "run"
    ckdir = run / "checkpoints"
    # A checkpoint every step of a long run: the poll below catches one being written.
    bigger = ["model.hidden_size=256", "model.num_attention_heads=8", "checkpoint.interval=1",
              "train.steps=1000"]  # fmt: skip
    proc = subprocess.Popen(
        train_cmd(1, run, *bigger), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(lambda: (ckdir / "latest").exists() and any(ckdir.glob(".tmp-step_*")), proc)
    finally:
        kill_tree(proc.pid)  # with the checkpoint writer's multiprocessing helpers
        proc.wait()
    previous = (ckdir / "latest").read_text().strip()
    assert (ckdir / previous / "meta.json").is_file()
    assert not any(
        p.name.startswith("step_") and not (p / "meta.json").exists() for p in ckdir.iterdir()
    )
    # The previous checkpoint loads and training continues from it.
    proc = train(1, run, *bigger, "train.steps=" + str(int(previous.split("_")[1]) + 1))
    assert f"resumed from {ckdir / previous}" in proc.stdout


def test_missing_data_path_is_a_clear_error(tmp_path):
    proc = train(1, tmp_path, "data.synthetic=false", "data.paths=[/no/such/shards]", expect=2)
    assert "data.paths entry /no/such/shards does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unwritable_checkpoint_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = train(1, tmp_path, f"checkpoint.dir={blocker}/ckpt", expect=2)
    assert "is not writable" in proc.stderr


def test_checkpoint_of_another_shape_is_refused(reference, tmp_path):
    start = reference / "checkpoints" / "step_00000004"
    proc = train(1, tmp_path, f"train.resume={start}", "model.hidden_size=128", expect=2)
    assert "model.hidden_size=64 but the config says 128" in proc.stderr


def test_corrupt_checkpoint_meta_is_refused(reference, tmp_path):
    bad = tmp_path / "ckpt" / "step_00000004"
    bad.mkdir(parents=True)
    (bad / "meta.json").write_text("{not json")
    proc = train(1, tmp_path, f"train.resume={bad}", expect=2)
    assert "meta.json is corrupt" in proc.stderr


def test_train_help():
    proc = subprocess.run([sys.executable, "-m", "mtp_dist.train", "--help"], cwd=ROOT,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0 and "--config" in proc.stdout


def export_step8(run: Path, out: Path, given_as_run_dir: bool = False) -> dict:
    """`python -m mtp_dist.export` of the run's last checkpoint (step 8), loaded back; the
    checkpoint given as its step directory, or as the run directory (its `latest`)."""
    import torch

    source = run if given_as_run_dir else run / "checkpoints" / "step_00000008"
    proc = subprocess.run(
        [sys.executable, "-m", "mtp_dist.export", str(source), str(out)],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Warning" not in proc.stderr, "upstream warnings are shown only with --verbose"
    return torch.load(out, weights_only=False)


def test_consolidated_export_is_layout_independent(reference, tp2pp2, tmp_path):
    import torch

    a = export_step8(reference, tmp_path / "ref.pt")
    b = export_step8(tp2pp2, tmp_path / "tp2pp2.pt", given_as_run_dir=True)
    assert a["format"] == "mtp-dist-consolidated-v1" and a["step"] == b["step"] == 8
    assert set(a["state"]) == set(b["state"])
    assert a["state"]["trunk.layers.1.mlp.linear_fc1.weight"].shape == (2 * 192, 64)
    for k in a["state"]:
        torch.testing.assert_close(a["state"][k], b["state"][k], rtol=0, atol=1e-5, msg=k)


def test_non_finite_steps_are_skipped_then_the_run_stops_with_a_checkpoint(reference, tmp_path):
    """Weights of scale 1e30 overflow every gradient: each step is skipped (no update), the
    learning-rate schedule still follows the step count, and after train.max_bad_steps in a
    row the run saves and stops with a clear message (exit 3)."""
    proc = train(1, tmp_path, "model.init_std=1e30", "train.max_bad_steps=2",
                 "checkpoint.interval=0", expect=3)  # fmt: skip
    assert "3 non-finite steps in a row" in proc.stderr and "train.max_bad_steps=2" in proc.stderr
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [True, True, True]
    assert records[-1]["skipped_steps"] == 3
    ref = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records] == [r["lr"] for r in ref[:3]]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000003"


def test_activation_recomputation_gives_the_same_losses(reference, tmp_path):
    train(1, tmp_path, "train.recompute=true", "train.steps=3")
    got, ref = losses(tmp_path), losses(reference)
    for step in (1, 2, 3):
        assert got[step] == pytest.approx(ref[step], rel=1e-6)


def test_checkpoint_of_another_tokenizer_is_refused(tmp_path):
    from mtp_dist.checkpointing import CheckpointError, check_compatible

    meta = {"config": {"model": {"hidden_size": 64}}, "tokenizer_hash": "a" * 64}
    check_compatible(meta, {"hidden_size": 64}, "a" * 64, tmp_path)
    with pytest.raises(CheckpointError, match="trained with tokenizer aaaaaaaaaaaa"):
        check_compatible(meta, {"hidden_size": 64}, "b" * 64, tmp_path)


@pytest.fixture(scope="module")
def zero2(tmp_path_factory):
    run = tmp_path_factory.mktemp("zero2")
    train(2, run, "engine=deepspeed", "deepspeed.zero_stage=2")
    return run


def test_deepspeed_engine_matches_megatron_engine(reference, zero2):
    """Same model, trainer, data and schedule: ZeRO-2 on 2 ranks gives the megatron engine's
    single-process losses."""
    ref, got = losses(reference), losses(zero2)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=RESHARD_RTOL)


def test_deepspeed_zero3_engine_matches_megatron_engine(reference, tmp_path):
    """The trainer's ZeRO-3 path (model built partitioned under zero.Init, initial weights
    written into the partitions) on 2 ranks gives the megatron engine's single-process
    losses."""
    train(2, tmp_path, "engine=deepspeed", "deepspeed.zero_stage=3")
    ref, got = losses(reference), losses(tmp_path)
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=RESHARD_RTOL)


def test_kill9_then_resume_is_exact_deepspeed_zero2(zero2, tmp_path):
    _kill_and_resume(
        2, tmp_path / "run", losses(zero2), "engine=deepspeed", "deepspeed.zero_stage=2"
    )


def test_deepspeed_checkpoint_exports_like_megatron(reference, zero2, tmp_path):
    import torch

    outs = [export_step8(reference, tmp_path / "ref.pt")["state"],
            export_step8(zero2, tmp_path / "zero2.pt")["state"]]  # fmt: skip
    assert set(outs[0]) == set(outs[1])
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k], rtol=0, atol=1e-5, msg=k)


def test_deepspeed_universal_checkpoint_resumes_on_one_rank(zero2, tmp_path):
    out = tmp_path / "universal"
    proc = subprocess.run(
        [sys.executable, "-m", "mtp_dist.engines.deepspeed", "to-universal",
         str(zero2 / "checkpoints" / "step_00000004"), str(out)],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp_path / "run"
    train(1, run, "engine=deepspeed", "deepspeed.zero_stage=2", f"train.resume={out}")
    got, ref = losses(run), losses(zero2)
    assert min(got) == 5
    for step in range(5, STEPS + 1):
        assert got[step] == pytest.approx(ref[step], rel=RESHARD_RTOL)


def test_deepspeed_launcher_script(reference, tmp_path):
    """launch/deepspeed.sh (the deepspeed launcher, 2 CPU ranks, ZeRO-1) gives the reference
    losses."""
    proc = subprocess.run(
        ["bash", "launch/deepspeed.sh", "2", "configs/tiny.yaml", f"run.dir={tmp_path}", *BASE,
         "train.steps=3", "deepspeed.zero_stage=1", "checkpoint.interval=0"],
        cwd=ROOT, env={**env(), "MASTER_PORT": str(free_port())}, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    got, ref = losses(tmp_path), losses(reference)
    for step in (1, 2, 3):
        assert got[step] == pytest.approx(ref[step], rel=RESHARD_RTOL)
