"""The `slurm/` templates and the multi-node launchers on a real two-node SLURM cluster started
on this machine (tests/slurm_cluster.py): jobs are submitted with `sbatch` exactly as a user
does, and the results are read from the run and output directories.

Every multi-node training here is TP2xPP2 over 2 nodes x 2 ranks (or TP2xDP2 for torchrun), on
the tiny config with synthetic data, checked against one process (rel 1e-5) and, across a
preemption or a node failure, against the uninterrupted job (exactly)."""

from __future__ import annotations

import filecmp
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.support import ROOT, losses

pytestmark = pytest.mark.slow

STEPS = 24
COMMON = [
    "data.synthetic=true",
    f"train.steps={STEPS}",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.warmup_steps=2",
    "checkpoint.interval=8",
    "checkpoint.keep=10",
    "logging.wandb=false",
]
TP2PP2 = ["parallel.tensor=2", "parallel.pipeline=2"]
RTOL = 1e-5
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def job_env(**extra: str) -> dict:
    """The submitter's environment without a launcher's variables (sbatch exports it)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def submit_train(slurm, run: Path, *overrides: str, nodes: int = 2, per_node: int = 2) -> int:
    return slurm.sbatch(
        f"--nodes={nodes}",
        f"--output={run.parent / (run.name + '-%j.log')}",
        "slurm/train.sbatch",
        "configs/tiny.yaml",
        f"run.dir={run}",
        *COMMON,
        *overrides,
        cwd=ROOT,
        env=job_env(NPROC_PER_NODE=str(per_node)),
    )


def log_of(run: Path, job: int) -> str:
    return (run.parent / f"{run.name}-{job}.log").read_text()


def logged(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def wait_until(predicate, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


def ranks_on(node: str) -> list[psutil.Process]:
    """The training ranks running in a node's namespace (not the batch shell's checks)."""
    out = subprocess.run(
        ["ip", "netns", "pids", f"mtp-{node}"], capture_output=True, text=True
    ).stdout.split()
    found = []
    for pid in out:
        try:
            p = psutil.Process(int(pid))
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if "mtp_dist.train" in cmd and "--check" not in cmd:
            found.append(p)
    return found


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process run every layout is checked against."""
    run = tmp_path_factory.mktemp("single") / "run"
    cmd = [sys.executable, "-m", "mtp_dist.train", "--config", "configs/tiny.yaml"]
    proc = subprocess.run(
        [*cmd, f"run.dir={run}", *COMMON], cwd=ROOT, env=job_env(), capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return losses(run)


@pytest.fixture(scope="module")
def two_nodes(slurm, tmp_path_factory):
    """An uninterrupted 2-node TP2xPP2 job: (run dir, job id, its record)."""
    run = tmp_path_factory.mktemp("two_nodes") / "run"
    job = submit_train(slurm, run, *TP2PP2)
    info = slurm.wait(job, timeout=300)
    assert info["JobState"] == "COMPLETED", log_of(run, job)
    return run, job, info


# --- 1. data prep as an array job -----------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    cmd = [sys.executable, "-m", "data_prep"]
    subprocess.run(
        [*cmd, "stdlib-corpus", str(root / "text"), "--max-mb", "1", "--num-shards", "8"],
        check=True, capture_output=True, cwd=ROOT,
    )  # fmt: skip
    subprocess.run(
        [*cmd, "train-tokenizer", str(root / "text" / "*.jsonl"), "--output", str(root / "tok"),
         "--vocab-size", "512", "--threads", "1"],
        check=True, capture_output=True, cwd=ROOT,
    )  # fmt: skip
    return root


def test_data_prep_array_over_two_nodes_equals_one_run(slurm, corpus, tmp_path):
    inputs = str(corpus / "text" / "*.jsonl")
    tok = str(corpus / "tok.model")
    args = [inputs, "--tokenizer", tok]
    one = tmp_path / "one"
    subprocess.run(
        [sys.executable, "-m", "data_prep", "tokenize", *args, "--output-dir", str(one),
         "--no-progress"], check=True, capture_output=True, cwd=ROOT,
    )  # fmt: skip
    array = tmp_path / "array"
    out = f"--output={tmp_path}/tok-%A_%a.log"
    job = slurm.sbatch(
        "--array=0-3", out, "slurm/data_prep.sbatch", *args, "--output-dir", str(array),
        cwd=ROOT, env=job_env(),
    )  # fmt: skip
    tasks = slurm.wait(job, timeout=180)["tasks"]
    assert [t["JobState"] for t in tasks] == ["COMPLETED"] * 4
    assert {t["NodeList"] for t in tasks} == {"node1", "node2"}, "the array spans both nodes"
    shards = sorted(p.name for p in one.iterdir() if p.suffix in (".bin", ".idx"))
    n_inputs = len(list((corpus / "text").glob("*.jsonl")))
    assert n_inputs >= 4 and len(shards) == 2 * n_inputs  # a shard (.bin + .idx) per input
    assert sorted(p.name for p in array.iterdir() if p.suffix in (".bin", ".idx")) == shards
    for name in shards:
        assert filecmp.cmp(one / name, array / name, shallow=False), f"{name} differs"
    manifest = json.loads((array / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == n_inputs

    # A task that dies and is rerun redoes its own shards only: drop one of task 2's shards
    # (as a kill mid-write leaves it) and rerun task 2 alone, in the original 4-task split.
    lost = "shard-00002"  # shards go round-robin to tasks: task 2 has shards 2, 6, ...
    for suffix in (".bin", ".idx", ".json"):
        (array / f"{lost}{suffix}").unlink(missing_ok=True)
    before = {p.name: p.stat().st_mtime_ns for p in array.iterdir() if p.suffix == ".bin"}
    rerun = slurm.sbatch(
        "--array=2", out, "slurm/data_prep.sbatch", *args, "--output-dir", str(array),
        "--num-tasks", "4", cwd=ROOT, env=job_env(),
    )  # fmt: skip
    assert slurm.wait(rerun, timeout=120)["JobState"] == "COMPLETED"
    after = {p.name: p.stat().st_mtime_ns for p in array.iterdir() if p.suffix == ".bin"}
    assert {n for n in after if after[n] != before.get(n)} == {f"{lost}.bin"}
    assert filecmp.cmp(one / f"{lost}.bin", array / f"{lost}.bin", shallow=False)
    assert json.loads((array / "manifest.json").read_text())["complete"]

    # Training accepts the directory.
    check = subprocess.run(
        [sys.executable, "-m", "mtp_dist.train", "--check", "--config", "configs/tiny.yaml",
         "data.synthetic=false", f"data.paths=[{array}]", f"data.tokenizer={tok}",
         f"run.dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, env=job_env(),
    )  # fmt: skip
    assert check.returncode == 0 and check.stdout.startswith("ok:"), check.stdout + check.stderr


# --- 2. multi-node training ------------------------------------------------------------------


def test_two_node_job_reproduces_one_process(two_nodes, single):
    run, job, info = two_nodes
    got = losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, loss in single.items():
        assert got[step] == pytest.approx(loss, rel=RTOL), f"step {step}"
    log = log_of(run, job)
    assert "2 nodes x 2 processes, master node1:" in log
    assert "TP2 x PP2 x DP1" in log
    assert info["ExitCode"] == "0:0" and info.get("Restarts", "0") == "0"


def test_sbatch_wait_returns_the_training_exit_status(slurm, tmp_path):
    # A config error: one `error:` line in the job's log, and sbatch --wait exits 2.
    run = tmp_path / "run"
    proc = subprocess.run(
        ["sbatch", "--wait", "--nodes=1", f"--output={tmp_path}/bad-%j.log", "slurm/train.sbatch",
         "configs/tiny.yaml", f"run.dir={run}", "parallel.tensor=3"],
        cwd=ROOT, env={**slurm.env, **job_env()}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (log,) = tmp_path.glob("bad-*.log")
    errors = [line for line in log.read_text().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "parallel.tensor" in errors[0], log.read_text()


# --- 3. preemption ---------------------------------------------------------------------------


def test_preemption_saves_requeues_and_resumes_exactly(slurm, two_nodes, tmp_path):
    run = tmp_path / "run"
    job = submit_train(slurm, run, *TP2PP2)
    wait_until(lambda: len(logged(run)) >= 10, "step 10 of the first start")
    slurm.signal_batch(job, "USR1")
    info = slurm.wait_state(job, "PENDING", timeout=120)  # requeued, held until its BeginTime
    assert info["Restarts"] == "1"
    first_start = logged(run)
    saved = sorted((run / "checkpoints").glob("step_*"))[-1]
    stopped_at = int(saved.name.removeprefix("step_"))
    assert first_start[-1]["step"] == stopped_at < STEPS, "it saved where it stopped"
    slurm.release(job)
    info = slurm.wait(job, timeout=300)
    log = log_of(run, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert "restart 1:" in log and "requeueing job" in log
    steps = [r["step"] for r in logged(run)]
    assert steps == list(range(1, STEPS + 1)), "the restart went on from its checkpoint"
    assert losses(run) == losses(two_nodes[0]), "losses differ from the uninterrupted job"


def test_a_finished_job_does_not_requeue(slurm, two_nodes, tmp_path):
    # USR1 after the last step (the save at the end is done): no requeue.
    run, _, _ = two_nodes
    job = submit_train(slurm, run, *TP2PP2)
    info = slurm.wait(job, timeout=120)
    assert info["JobState"] == "COMPLETED" and info.get("Restarts", "0") == "0"
    assert "done:" in log_of(run, job)


# --- 4. node failure -------------------------------------------------------------------------


def test_node_failure_ends_the_job_and_a_resubmit_resumes_exactly(slurm, two_nodes, tmp_path):
    run = tmp_path / "run"
    job = submit_train(slurm, run, *TP2PP2)
    wait_until(lambda: len(logged(run)) >= 12, "step 12")
    victim = ranks_on("node2")[0]
    victim.kill()  # kill -9 one rank on the second node
    killed = time.monotonic()
    info = slurm.wait(job, timeout=120)
    took = time.monotonic() - killed
    assert info["JobState"] == "FAILED", log_of(run, job)
    assert took < 90, f"the job took {took:.0f} s to end after a rank died"
    assert not ranks_on("node1") and not ranks_on("node2"), "a rank outlived the job"
    saved = int((run / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert 8 <= saved < STEPS

    again = submit_train(slurm, run, *TP2PP2)  # the same command
    # A preemption signal after the last step (the final save under way) must not requeue a
    # finished run. The window is the final save and shutdown: seconds on this machine.
    wait_until(lambda: logged(run)[-1]["step"] == STEPS, "the last step")
    signalled = slurm.signal_batch(again, "USR1", check=False)
    info = slurm.wait(again, timeout=300)
    log = log_of(run, again)
    assert info["JobState"] == "COMPLETED" and info.get("Restarts", "0") == "0", log
    assert f"at step {saved}" in log
    if signalled:
        assert "all steps done: not requeued" in log, log
    assert losses(run) == losses(two_nodes[0]), "losses differ from the uninterrupted job"


# --- engine=deepspeed through the same template, and DeepSpeed's own SLURM launcher ----------


def test_deepspeed_engine_through_the_template(slurm, tmp_path):
    ds = ["engine=deepspeed", "deepspeed.zero_stage=2"]
    one = tmp_path / "one"
    proc = subprocess.run(
        [sys.executable, "-m", "mtp_dist.train", "--config", "configs/tiny.yaml",
         f"run.dir={one}", *COMMON, *ds, "train.steps=8"],
        cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    job = submit_train(slurm, run, *ds, "train.steps=8", per_node=1)
    info = slurm.wait(job, timeout=300)
    assert info["JobState"] == "COMPLETED", log_of(run, job)
    got, ref = losses(run), losses(one)
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=RTOL), f"step {step}"


def test_deepspeed_launcher_slurm_inside_an_allocation(slurm, tmp_path):
    run = tmp_path / "run"
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"cd {ROOT}\n"
        f"launch/deepspeed.sh 1 configs/tiny.yaml run.dir={run} "
        + " ".join(COMMON)
        + " deepspeed.zero_stage=1 train.steps=4\n"
    )
    job = slurm.sbatch("--nodes=2", "--exclusive", f"--output={tmp_path}/ds-%j.log", str(script),
                       cwd=tmp_path, env=job_env())  # fmt: skip
    info = slurm.wait(job, timeout=300)
    log = (tmp_path / f"ds-{job}.log").read_text()
    assert info["JobState"] == "COMPLETED", log
    assert "deepspeed --launcher slurm: 2 nodes x 1 processes, master node1:" in log
    assert "ok: 2 processes as TP1 x PP1 x DP2" in log, log[-3000:]
    assert sorted(losses(run)) == [1, 2, 3, 4]
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1


# --- 5. the chained pipeline -----------------------------------------------------------------


def test_pipeline_chains_three_jobs_to_a_trained_run(slurm, tmp_path):
    corpus = tmp_path / "corpus"
    subprocess.run(
        [sys.executable, "-m", "data_prep", "stdlib-corpus", str(corpus), "--max-mb", "1",
         "--num-shards", "4"], check=True, capture_output=True, cwd=ROOT,
    )  # fmt: skip
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(ROOT / "slurm/pipeline.sh"), str(corpus / "*.jsonl"), str(out),
         str(ROOT / "configs/tiny.yaml"),
         "data.synthetic=false", "train.steps=4", "logging.wandb=false", "checkpoint.interval=2"],
        cwd=tmp_path, env={**slurm.env, **job_env(TASKS="2", VOCAB_SIZE="512")},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0].split()
    tok, shards, train = int(first[2]), int(first[6]), int(first[-1])
    assert f"squeue -j {tok},{shards},{train}" in proc.stdout
    assert "Dependency=afterok:" in " ".join(f"{k}={v}" for k, v in slurm.job(train).items())
    info = slurm.wait(train, timeout=400)
    logs = "\n".join(p.read_text() for p in tmp_path.glob("*.log"))
    assert info["JobState"] == "COMPLETED", logs[-5000:]
    assert json.loads((out / "shards" / "manifest.json").read_text())["complete"]
    assert sorted(losses(out / "run")) == [1, 2, 3, 4]
    assert (out / "run" / "checkpoints" / "step_00000004").is_dir()


def test_a_failed_later_sbatch_cancels_the_jobs_before_it(slurm, tmp_path):
    """The training job cannot be submitted (no such partition): the tokenizer and tokenize
    jobs already queued are cancelled and named, not left to run for nothing."""
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    proc = subprocess.run(
        [str(ROOT / "slurm/pipeline.sh"), str(tmp_path / "*.jsonl"), str(tmp_path / "out"),
         str(ROOT / "configs/tiny.yaml")],
        cwd=tmp_path, env={**slurm.env, **job_env(TRAIN_SBATCH_ARGS="--partition=nope")},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    error = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")][-1]
    ids = re.search(r"cancelled the jobs already submitted \((\d+) (\d+)\)", error)
    assert ids and proc.stdout == "", error
    for job in ids.groups():
        info = slurm.wait(int(job), timeout=60)
        assert {t["JobState"] for t in info.get("tasks", [info])} == {"CANCELLED"}, info


# --- 6. torchrun across two nodes, no SLURM --------------------------------------------------


def test_torchrun_across_two_nodes(slurm, single, tmp_path):
    run = tmp_path / "run"
    overrides = " ".join([f"run.dir={run}", *COMMON, "parallel.tensor=2"])
    procs = []
    for rank, node in enumerate(("node1", "node2")):
        env = job_env(NNODES="2", NODE_RANK=str(rank), MASTER_ADDR="node1", NPROC_PER_NODE="2",
                      MASTER_PORT="29411")  # fmt: skip
        log = open(tmp_path / f"{node}.log", "wb")  # noqa: SIM115 (closed below)
        cmd = f"cd {ROOT} && exec launch/torchrun.sh configs/tiny.yaml {overrides}"
        procs.append((slurm.node_popen(node, cmd, env=env, stdout=log, stderr=log), log))
    try:
        for p, _ in procs:
            p.wait(timeout=300)
    finally:
        for p, log in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            log.close()
    outs = {n: (tmp_path / f"{n}.log").read_text() for n in ("node1", "node2")}
    assert [p.returncode for p, _ in procs] == [0, 0], outs
    got = losses(run)
    for step, loss in single.items():
        assert got[step] == pytest.approx(loss, rel=RTOL), f"step {step}"
