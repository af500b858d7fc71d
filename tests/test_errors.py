"""The error contract, from the user's side: every anticipated failure of train, export and
report is one line `error: ...` naming the input and the fix, exit status 2, no traceback; an
unexpected exception shows its traceback and says it is a bug (exit 1)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mtp_dist.errors import run_cli
from tests.support import ROOT

TINY = ["--config", "configs/tiny.yaml", "data.synthetic=true"]


def run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("model.head_loss_weights=[1, -1, 1, 1]", ["model.head_loss_weights[1]=-1.0", ">= 0"]),
        ("model.head_loss_weights=[0, 0, 0, 0]", ["model.head_loss_weights are all zero"]),
        ("train.eval_steps=0", ["train.eval_steps=0", "train.eval_interval"]),
        ("checkpoint.keep=0", ["checkpoint.keep must be >= 1"]),
        ("logging.interval=0", ["logging.interval must be >= 1"]),
        ("train.global_batch_size=0", ["train.global_batch_size must be >= 1"]),
        ("model.vocab_multiple=0", ["model.vocab_multiple must be >= 1"]),
        ("train.lr=0", ["train.lr=0.0 must be a finite number > 0"]),
        ("train.lr=-1e-3", ["train.lr=-0.001"]),
        ("train.lr=.nan", ["train.lr=nan"]),
        ("train.beta1=1.0", ["train.beta1=1.0 must be in [0, 1)"]),
        ("train.beta2=-0.1", ["train.beta2=-0.1 must be in [0, 1)"]),
        ("model.init_std=0", ["model.init_std=0.0"]),
        ("data.split=98,1", ["data.split='98,1' must be three non-negative numbers"]),
        ("data.split=0,1,1", ["train > 0"]),
        ("data.split=a,b,c", ["data.split='a,b,c'"]),
        ("train.watchdog_seconds=-1", ["train.watchdog_seconds=-1.0"]),
        ("train.steps=ten", ["train.steps must be int"]),
        ("engine=fsdp", ["engine='fsdp' is not an engine"]),
    ],
)
def test_train_refuses_nonsense_in_the_config(override, fragments):
    overrides = [override, "train.eval_interval=2"] if "eval_steps" in override else [override]
    assert_user_error(run("mtp_dist.train", *TINY, *overrides), *fragments)


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["model.n_future_tokens=1", "train.trainable=heads"],
         ["train.trainable=heads", "model.n_future_tokens=1", "n_future_tokens >= 2"]),
        (["model.head_loss_weights_end=[1, 0.5]"],
         ["model.head_loss_weights_end has 2 entries", "model.n_future_tokens=4"]),
        (["model.head_loss_weights_end=[1, 0.5, -0.1, 0]"], ["model.head_loss_weights_end[2]"]),
        (["model.head_loss_weights_end=[0, 0, 0, 0]"],
         ["model.head_loss_weights_end are all zero"]),
        (["train.trainable=heads", "model.head_loss_weights_end=[1, 0, 0, 0]"],
         ["model.head_loss_weights_end=[1.0, 0.0, 0.0, 0.0]", "heads 2..n"]),
        (["train.trainable=heads", "parallel.pipeline=2"],
         ["train.trainable=heads with parallel.pipeline=2", "parallel.pipeline=1"]),
    ],
)  # fmt: skip
def test_train_refuses_bad_head_training_settings(overrides, fragments):
    assert_user_error(run("mtp_dist.train", *TINY, *overrides), *fragments)


def test_train_refuses_negative_blend_weights(tmp_path):
    proc = run("mtp_dist.train", *TINY, "data.synthetic=false", "data.paths=[a, b]",
               "data.weights=[1, -2]")  # fmt: skip
    assert_user_error(proc, "data.weights[1]=-2.0")


def test_invalid_yaml_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1,\n")
    assert_user_error(run("mtp_dist.train", "--config", str(bad)), str(bad), "not valid YAML")


def test_binary_yaml_is_refused(tmp_path):
    bad = tmp_path / "bin.yaml"
    bad.write_bytes(bytes(range(256)))
    assert_user_error(run("mtp_dist.train", "--config", str(bad)), "is not UTF-8 text")


@pytest.mark.parametrize("override", ["train.steps", "=3", "train..steps=3", "train.steps=[1,"])
def test_bad_override_syntax(override):
    assert_user_error(run("mtp_dist.train", *TINY, override), "override")


def test_config_file_that_is_a_directory(tmp_path):
    assert_user_error(run("mtp_dist.train", "--config", str(tmp_path)), "does not exist")


def test_unwritable_checkpoint_dir_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    proc = run("mtp_dist.train", *TINY, f"checkpoint.dir={tmp_path / 'file' / 'ck'}",
               "train.steps=1", timeout=300)  # fmt: skip
    assert_user_error(proc, "is not writable")


def test_export_without_a_checkpoint_says_so(tmp_path):
    proc = run("mtp_dist.export", str(tmp_path), str(tmp_path / "m.pt"))
    assert_user_error(proc, "no such checkpoint", str(tmp_path))
    assert not list(tmp_path.glob("*.tmp*"))


def test_export_of_a_garbage_latest_pointer(tmp_path):
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    (ck / "latest").write_bytes(b"\x00\xffgarbage")
    assert_user_error(run("mtp_dist.export", str(tmp_path), str(tmp_path / "m.pt")), "corrupt")


@pytest.mark.parametrize("meta", ["[1, 2]", '{"step": "x", "config": {}}', "{not json"])
def test_export_of_a_checkpoint_with_a_bad_meta(tmp_path, meta):
    step = tmp_path / "step_00000001"
    step.mkdir()
    (step / "meta.json").write_text(meta)
    assert_user_error(run("mtp_dist.export", str(step), str(tmp_path / "m.pt")), "is corrupt")


def _metrics(tmp_path, lines: list[str]):
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def _record(step: int) -> str:
    return json.dumps({"step": step, "loss": 2.0, "head_losses": [1.0, 1.0]})


def test_report_skips_a_truncated_last_line(tmp_path):
    _metrics(tmp_path, [_record(1), _record(2), _record(3)[:20]])
    proc = run("mtp_dist.report", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "2 steps" in proc.stdout and "truncated last line" in proc.stderr
    assert (tmp_path / "losses.png").stat().st_size > 0
    assert not list(tmp_path.glob("*.tmp*"))


def test_report_refuses_a_corrupt_middle_line(tmp_path):
    _metrics(tmp_path, [_record(1), "garbage", _record(3)])
    assert_user_error(run("mtp_dist.report", str(tmp_path)), "line 2")


def test_report_of_an_empty_or_missing_run(tmp_path):
    assert_user_error(run("mtp_dist.report", str(tmp_path)), "metrics.jsonl not found")
    _metrics(tmp_path, [])
    assert_user_error(run("mtp_dist.report", str(tmp_path)), "holds no steps")


def test_report_over_runs_of_another_number_of_heads(tmp_path):
    """A directory reused by a run with other heads: the last run's records are plotted, the
    others named in a note (this crashed with a traceback)."""
    old = [json.dumps({"step": s, "loss": 2.0, "head_losses": [1.0] * 4}) for s in (1, 2, 3)]
    _metrics(tmp_path, [*old, _record(1), _record(2)])
    proc = run("mtp_dist.report", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "2 steps" in proc.stdout and "3 records of another number of heads" in proc.stderr
    assert (tmp_path / "losses.png").stat().st_size > 0


@pytest.mark.parametrize(
    "record, fragment",
    [
        ({"step": 1, "head_losses": ["x", 1.0]}, "head_losses holds 'x'"),
        ({"step": "1", "head_losses": [1.0]}, "step='1'"),
        ({"step": 1, "head_losses": 2.0}, "head_losses must be a list"),
        ({"step": 1, "head_losses": [1.0], "eval_head_accuracy": [0.5, 0.5]}, "one per head"),
    ],
)
def test_report_refuses_records_of_the_wrong_types(tmp_path, record, fragment):
    _metrics(tmp_path, [json.dumps(record), _record(2)])
    assert_user_error(run("mtp_dist.report", str(tmp_path)), "line 1", fragment)


def test_report_never_writes_over_its_input(tmp_path):
    _metrics(tmp_path, [_record(1)])
    before = (tmp_path / "metrics.jsonl").read_bytes()
    out = tmp_path / "metrics.jsonl"
    assert_user_error(run("mtp_dist.report", str(tmp_path), "--out", str(out)), "its input")
    (tmp_path / "link.png").symlink_to(out)
    proc = run("mtp_dist.report", str(tmp_path), "--out", str(tmp_path / "link.png"))
    assert_user_error(proc, "its input")
    assert (tmp_path / "metrics.jsonl").read_bytes() == before


def test_report_into_a_missing_directory(tmp_path):
    _metrics(tmp_path, [_record(1)])
    proc = run("mtp_dist.report", str(tmp_path), "--out", str(tmp_path / "no" / "x.png"))
    assert_user_error(proc, "No such file or directory", "check the path")
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.parametrize(
    "args",
    [
        ["mtp_dist.plan", "configs/paper/1.3b-n4.yaml", "--gpus", "8"],
        ["mtp_dist.train", "--check", *TINY, "run.dir=RUN"],
        ["mtp_dist.report", "RUN"],
        ["data_prep", "--help"],
    ],
)
def test_a_closed_stdout_ends_quietly(tmp_path, args):
    """`cmd | head` whose reader has gone: no traceback, no error line, the status of a Unix
    tool ended by SIGPIPE (141), or 0 where nothing was left to write."""
    import os

    _metrics(tmp_path, [_record(1)])
    args = [str(tmp_path) if a == "RUN" else a.replace("=RUN", f"={tmp_path}") for a in args]
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120)  # fmt: skip
    finally:
        os.close(write)
    assert proc.returncode in (0, 141) and proc.stderr == "", proc.stderr[-3000:]
    assert proc.returncode == 141 or args[0] == "data_prep"  # argparse's help drops it itself


def test_an_unexpected_exception_is_called_a_bug(capsys):
    def broken() -> int:
        return 1 // 0

    assert run_cli(broken) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError" in err
    assert err.strip().splitlines()[-1].startswith("error: this is a bug in mtp-dist")


def test_os_errors_name_the_path_and_a_fix(capsys):
    def full_disk() -> int:
        import errno

        raise OSError(errno.ENOSPC, "No space left on device", "/data/shard.bin")

    assert run_cli(full_disk) == 2
    assert capsys.readouterr().err == (
        "error: /data/shard.bin: No space left on device: free disk space or write elsewhere\n"
    )


def launch(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        ["bash", f"launch/{script}", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=300, env={**os.environ, **env},
    )  # fmt: skip


@pytest.mark.parametrize(
    "script, args, env, fragments",
    [
        ("torchrun.sh", [], {}, ["usage: launch/torchrun.sh CONFIG"]),
        ("torchrun.sh", ["configs/tiny.yaml"], {"NPROC_PER_NODE": "x"}, ["NPROC_PER_NODE=x"]),
        ("torchrun.sh", ["configs/tiny.yaml"], {"NPROC_PER_NODE": "0"}, ["NPROC_PER_NODE=0"]),
        (
            "torchrun.sh",
            ["configs/tiny.yaml"],
            {"NPROC_PER_NODE": "1", "NNODES": "2", "MASTER_ADDR": ""},
            ["NNODES=2 needs MASTER_ADDR"],
        ),
        (
            "torchrun.sh",
            ["configs/tiny.yaml"],
            {"NPROC_PER_NODE": "1", "NNODES": "2", "MASTER_ADDR": "h", "NODE_RANK": "2"},
            ["NODE_RANK=2 must be 0..1"],
        ),
        (
            "torchrun.sh",
            ["configs/tiny.yaml"],
            {"NPROC_PER_NODE": "1", "MASTER_PORT": "70000"},
            ["MASTER_PORT=70000 is not a port"],
        ),
        ("torchrun.sh", ["configs/nope.yaml"], {}, ["configs/nope.yaml does not exist"]),
        (
            "torchrun.sh",
            ["configs/tiny.yaml", "parallel.tensor=2"],
            {"NPROC_PER_NODE": "3"},
            ["does not divide the world size 3"],
        ),
        ("deepspeed.sh", ["2"], {}, ["usage: launch/deepspeed.sh NPROC_PER_NODE CONFIG"]),
        ("deepspeed.sh", ["two", "configs/tiny.yaml"], {}, ["NPROC_PER_NODE=two"]),
        ("deepspeed.sh", ["0", "configs/tiny.yaml"], {}, ["NPROC_PER_NODE=0"]),
        (
            "deepspeed.sh",
            ["2", "configs/tiny.yaml"],
            {"MASTER_PORT": "99999"},
            ["MASTER_PORT=99999 is not a port"],
        ),
        (
            "deepspeed.sh",
            ["2", "configs/tiny.yaml", "deepspeed.zero_stage=0"],
            {},
            ["deepspeed.zero_stage=0 is not supported"],
        ),
    ],
)
def test_launch_scripts_check_before_starting_ranks(script, args, env, fragments):
    """A mistake is found once, before any rank starts: one error line, not N tracebacks."""
    proc = launch(script, *args, **env)
    assert_user_error(proc, *fragments)
    assert "ChildFailedError" not in proc.stderr


@pytest.mark.parametrize(
    "script, args, fragments",
    [
        ("pipeline.sh", ["CORPUS", "OUT", "configs/tiny.yaml", "train.stepz=3"], ["train.stepz"]),
        ("tokenizer.sbatch", ["x.jsonl", "--output", "t"], ["submit this with sbatch"]),
        ("train.sbatch", ["configs/tiny.yaml"], ["submit this with sbatch"]),
        ("data_prep.sbatch", ["x.jsonl"], ["submit this as an array: sbatch --array"]),
    ],
)
def test_slurm_scripts_check_before_submitting(tmp_path, script, args, fragments):
    """Run with plain bash, each template says to submit it with sbatch; the pipeline checks
    the training config and overrides before it submits anything (sbatch is never reached:
    where it is not installed, reaching it would be "command not found" instead)."""
    import os

    (tmp_path / "c.jsonl").write_text('{"text": "a"}\n')
    names = {"CORPUS": str(tmp_path / "*.jsonl"), "OUT": str(tmp_path / "out")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(
        ["bash", f"slurm/{script}", *(names.get(a, a) for a in args)], cwd=ROOT,
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert_user_error(proc, *fragments)
    assert "command not found" not in proc.stderr and not list(tmp_path.glob("out/*"))


def test_train_check_reports_the_layout(tmp_path):
    proc = run("mtp_dist.train", "--check", "--world-size", "4", *TINY, "parallel.tensor=2",
               f"run.dir={tmp_path}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("ok: 4 processes as TP2 x PP1 x DP2")


def test_the_demo_keeps_the_contract_and_redoes_an_empty_stage(tmp_path):
    """A typo in the training overrides is found before any stage runs; a corpus marker over
    no corpus (an older demo's) is redone, not trusted; a failing stage is one error line."""
    work = tmp_path / "demo"
    proc = run("mtp_dist.demo", "--workdir", str(work), "train.stepz=3")
    assert_user_error(proc, "unknown key train.stepz")
    assert not work.exists()
    proc = run("mtp_dist.demo", "--workdir", str(work), "--corpus-mb", "0")
    assert proc.returncode == 2 and "argument --corpus-mb: 0 must be a finite number" in proc.stderr
    (work / "corpus").mkdir(parents=True)
    (work / "corpus" / ".done").write_text("ok")
    proc = run("mtp_dist.demo", "--workdir", str(work), "--corpus-mb", "0.2", "--vocab-size", "10")
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # The stage's own line (the reason), then the demo's (which stage, and that a rerun resumes).
    assert len(errors) == 2 and "raise --vocab-size" in errors[0], errors
    assert errors[1].startswith("error: the demo's tokenizer stage failed (exit status 2")
    assert sum(p.stat().st_size for p in (work / "corpus").glob("*.jsonl")) > 100_000
    assert not (work / "tokenizer" / "tokenizer.model").exists()
