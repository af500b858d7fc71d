"""A training run never hangs and never loses or overwrites work on ordinary mistakes, seen
from the user's side (command, exit status, message): the watchdog, the run-directory lock,
refused overwrites, a finished run left alone, and what a resumed run must keep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtp_dist.distributed import free_port
from tests.support import ROOT

pytestmark = pytest.mark.slow  # subprocess trainings

BASE = [
    "--config", "configs/tiny.yaml", "data.synthetic=true", "logging.wandb=false",
    "train.global_batch_size=4", "train.micro_batch_size=2", "train.warmup_steps=1",
    "checkpoint.interval=2",
]  # fmt: skip


def env(**extra: str) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR")}
    return {**base, "OMP_NUM_THREADS": "1", **extra}


def train(run: Path, *overrides: str, expect: int = 0, **extra_env: str):
    proc = subprocess.run(
        [sys.executable, "-m", "mtp_dist.train", *BASE, f"run.dir={run}", *overrides],
        cwd=ROOT, env=env(**extra_env), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def one_error(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def snapshot(ckdir: Path) -> dict[str, float]:
    """Every checkpoint file and its modification time (not the directory's lock file)."""
    return {
        str(p.relative_to(ckdir)): p.stat().st_mtime_ns
        for p in ckdir.rglob("*")
        if p.name != ".lock"
    }


def test_a_rank_waiting_for_a_missing_peer_is_stopped_by_the_watchdog(tmp_path):
    """World size 2 but only one process: rank 0 would wait for rank 1 for 30 minutes."""
    port = str(free_port())
    proc = train(
        tmp_path / "run", "train.watchdog_seconds=3", expect=4,
        RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
    )  # fmt: skip
    assert "watchdog: rank 0 made no progress for" in proc.stderr
    assert "stuck in: creating the process group (world size 2)" in proc.stderr
    assert "init_process_group" in proc.stderr  # the main thread's stack


def test_two_trainings_cannot_share_a_run_directory(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "mtp_dist.train", *BASE, f"run.dir={run}", "train.steps=100000"],
        cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 300
        while not (run / "metrics.jsonl").exists():
            assert first.poll() is None and time.time() < deadline, first.stderr.read()[-2000:]
            time.sleep(0.2)
        second = train(run, "train.steps=4", expect=2)
        assert f"is in use by pid {first.pid}" in one_error(second)
    finally:
        first.terminate()
        assert first.wait(timeout=120) == 0  # SIGTERM: saves and exits 0


def test_checkpoints_of_another_run_are_not_overwritten(tmp_path):
    run = tmp_path / "run"
    train(run, "train.steps=4")
    ckdir = run / "checkpoints"
    before = snapshot(ckdir)
    refused = train(run, "train.steps=4", "train.resume=none", expect=2)
    assert "already holds checkpoints up to step_00000004" in one_error(refused)
    assert "checkpoint.overwrite=true" in one_error(refused)
    (ckdir / "latest").unlink()
    refused = train(run, "train.steps=4", expect=2)
    assert "this run starts from scratch" in one_error(refused)
    older = train(run, "train.steps=4", f"train.resume={ckdir / 'step_00000002'}", expect=2)
    assert "starts from step 2" in one_error(older)
    after = snapshot(ckdir)
    assert after == {k: v for k, v in before.items() if k != "latest"}


def test_overwrite_replaces_only_when_asked(tmp_path):
    run = tmp_path / "run"
    train(run, "train.steps=2")
    old = (run / "checkpoints" / "step_00000002" / "meta.json").read_text()
    train(run, "train.steps=2", "train.resume=none", "checkpoint.overwrite=true", "train.seed=9")
    new = (run / "checkpoints" / "step_00000002" / "meta.json").read_text()
    assert json.loads(old)["config"]["train"]["seed"] == 1234
    assert json.loads(new)["config"]["train"]["seed"] == 9
    assert not list((run / "checkpoints").glob(".*step_*"))


def test_a_finished_run_is_left_alone(tmp_path):
    run = tmp_path / "run"
    train(run, "train.steps=4")
    before = snapshot(run / "checkpoints")
    for steps in ("4", "3"):
        proc = train(run, f"train.steps={steps}")
        assert "is at step 4" in proc.stdout and "nothing to do" in proc.stdout
    assert snapshot(run / "checkpoints") == before


def test_a_run_can_be_extended_on_the_same_schedule(tmp_path):
    """train.steps grows on resume; the cosine keeps its recorded horizon (4 steps), so the
    extension runs at the floor, and the run goes on from where it stopped."""
    run = tmp_path / "run"
    train(run, "train.steps=4")
    proc = train(run, "train.steps=6")
    assert "resumed from" in proc.stdout and "at step 4" in proc.stdout
    by_step = {r["step"]: r for r in records(run)}
    assert sorted(by_step) == [1, 2, 3, 4, 5, 6]
    floor = 1e-3 * 0.1  # configs/tiny.yaml: lr 1e-3, min_lr_ratio 0.1
    assert by_step[5]["lr"] == pytest.approx(floor) and by_step[6]["lr"] == pytest.approx(floor)
    meta = json.loads((run / "checkpoints" / "step_00000006" / "meta.json").read_text())
    assert meta["lr_decay_steps"] == 4


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.seed=7", "train.seed=7"),
        ("model.seq_length=32", "model.seq_length=32"),
        ("train.lr_decay_steps=10", "train.lr_decay_steps=10"),
    ],
)
def test_a_resumed_run_must_keep_what_decides_its_data_and_schedule(tmp_path, override, key):
    run = tmp_path / "run"
    train(run, "train.steps=2")
    message = one_error(train(run, "train.steps=4", override, expect=2))
    assert key in message and "step_00000002" in message


def test_a_damaged_checkpoint_is_refused_by_every_reader(tmp_path, capsys):
    """A missing or truncated .distcp file: resume, export and generate each end with one
    `error:` line naming the checkpoint (torch's CheckpointException is a BaseException, which
    used to escape as a traceback), and nothing is written."""
    from mtp_dist.export import main as export

    run = tmp_path / "run"
    train(run, "train.steps=2", "data.tokenizer=byte", "model.vocab_size=259")
    step = run / "checkpoints" / "step_00000002"
    (step / "engine" / "__0_1.distcp").unlink()
    proc = train(run, "train.steps=4", "data.tokenizer=byte", "model.vocab_size=259", expect=2)
    assert f"checkpoint {step} cannot be loaded (FileNotFoundError" in one_error(proc)
    generate = subprocess.run(
        [sys.executable, "-m", "mtp_dist.generate", str(run), "--prompt", "a"],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert generate.returncode == 2 and "cannot be loaded" in one_error(generate)
    with open(step / "engine" / "__0_0.distcp", "r+b") as f:
        f.truncate(1000)
    assert export([str(run), str(tmp_path / "m.pt")]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: checkpoint {step} cannot be loaded")
    assert not (tmp_path / "m.pt").exists() and not list(tmp_path.glob("m.pt.tmp*"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        ".lock",
        "latest",
        "step_00000002",
    ]


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB file system (tmpfs; root only), unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(disk)],
                             capture_output=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (not root?): {mounted.stderr.decode()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_at_a_save_is_an_error_not_a_bug(small_disk):
    """torch reports a full disk from its writer threads as text in a RuntimeError inside a
    CheckpointException: the run says the disk is full, exit 2, and leaves no partial
    checkpoint behind (the previous state: none)."""
    run = small_disk / "run"
    proc = train(run, "train.steps=2", expect=2)
    message = one_error(proc)
    assert "No space left on device" in message or "the disk is full" in message, message
    assert "free disk space" in message
    assert not list((run / "checkpoints").glob("*step_*"))
