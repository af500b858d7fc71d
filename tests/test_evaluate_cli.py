"""`python -m mtp_dist.evaluate humaneval` on a tiny byte-level model and a small problems file
in HumanEval's format (HumanEval's own prompts do not fit a 64-token context): samples.jsonl and
summary.json agree with each other and with the printed table; a run killed mid-write and
rerun, in steps, gives the samples and summary of one uninterrupted run; a directory of another
model or other settings is refused, untouched; bad input is one `error:` line, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mtp_dist.evaluate.cli import main
from mtp_dist.evaluate.passk import mean_pass_at_k
from tests.support import ROOT

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*tp_group is None, using default tp group:DeprecationWarning"
)

PROBLEMS = [
    ("t/0", "def f():\n    return 1  #", "def check(c):\n    assert c() == 1\n", "f"),
    ("t/1", "def g():\n    return", "def check(c):\n    assert c() == 2\n", "g"),
    ("t/2", "def h(x):\n    ", "def check(c):\n    pass\n", "h"),
]


@pytest.fixture(scope="module")
def setup(megatron_1proc, tmp_path_factory):
    """(the n=4 export, an n=1 export, the problems file)."""
    from mtp_dist.checkpointing import export_consolidated
    from mtp_dist.config import Config, DataConfig
    from mtp_dist.model.model import build_model
    from mtp_dist.model.weights import init_weights
    from tests.test_generate import _train_tiny_model, tiny_config

    root = tmp_path_factory.mktemp("evaluate")
    cfg, model, _ = _train_tiny_model()
    data = DataConfig(synthetic=True, tokenizer="byte")
    n4 = export_consolidated(model, root / "n4.pt", Config(model=cfg, data=data).to_dict(), 8)
    one = build_model(tiny_config(n=1))
    init_weights(one, seed=1)
    config1 = Config(model=tiny_config(n=1), data=data).to_dict()
    n1 = export_consolidated(one, root / "n1.pt", config1, 0)
    problems = root / "problems.jsonl"
    lines = [
        {"task_id": t, "prompt": p, "canonical_solution": "", "test": test, "entry_point": e}
        for t, p, test, e in PROBLEMS
    ]
    problems.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return n4, n1, problems


def evaluate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mtp_dist.evaluate", "humaneval", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


SETTINGS = ["--num-samples", "4", "--temperature", "0.9", "--k", "1,2", "--max-new-tokens", "10"]


def samples(directory) -> list[dict]:
    lines = (directory / "samples.jsonl").read_text().splitlines()
    return sorted((json.loads(line) for line in lines), key=lambda r: (r["task_id"], r["sample"]))


def test_a_run_its_files_and_a_resumed_run(setup, tmp_path):
    n4, n1, problems = setup
    common = [str(n4), "--problems", str(problems), *SETTINGS, "--speculative", "3"]
    whole = evaluate(*common, "--output", str(tmp_path / "a"), "--batch", "5")
    assert whole.returncode == 0, whole.stderr[-3000:]
    records = samples(tmp_path / "a")
    assert [(r["task_id"], r["sample"]) for r in records] == [
        (t, s) for t, *_ in PROBLEMS for s in range(4)
    ]
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    counts = [(4, sum(r["passed"] for r in records if r["task_id"] == t)) for t, *_ in PROBLEMS]
    for k in (1, 2):
        assert summary[f"pass@{k}"] == pytest.approx(mean_pass_at_k(counts, k), abs=1e-6)
        assert f"pass@{k:<4d} {summary[f'pass@{k}']:.4f}" in whole.stdout
    assert all(r["passed"] == (r["error"] is None) for r in records)
    assert summary["settings"]["speculative"] == 3 and set(summary["acceptance"]) == {"2", "3"}
    assert summary["model"]["step"] == 8 and summary["problems"] == 3

    # In steps: one problem, then killed while writing a line, then the rest.
    b = tmp_path / "b"
    first = evaluate(*common, "--output", str(b), "--limit", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert len(samples(b)) == 4
    with open(b / "samples.jsonl", "a") as f:
        f.write('{"task_id": "t/1", "sam')
    rest = evaluate(*common, "--output", str(b), "--batch", "3")
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert samples(b) == records
    resumed = json.loads((b / "summary.json").read_text())
    assert resumed == summary

    # Another model, other settings: refused, the samples untouched.
    before = (b / "samples.jsonl").read_bytes()
    refusals = [
        ([str(n1), "--problems", str(problems), *SETTINGS], "model.step"),
        ([*common, "--seed", "1"], "settings.seed: 0 there, 1 now"),
        ([*common[:-2], "--speculative", "2"], "settings.speculative"),
    ]
    for args, message in refusals:
        proc = evaluate(*args, "--output", str(b))
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert (b / "samples.jsonl").read_bytes() == before


@pytest.mark.slow
def test_data_parallel_under_torchrun_gives_one_process_results(setup, tmp_path):
    """Two data-parallel ranks continue a one-process run that did the first problem: the
    samples and the summary are those of one process doing everything."""
    from tests.support import torchrun

    n4, _, problems = setup
    common = [str(n4), "--problems", str(problems), *SETTINGS, "--batch", "3"]
    alone = evaluate(*common, "--output", str(tmp_path / "alone"))
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert evaluate(*common, "--output", str(tmp_path / "dp"), "--limit", "1").returncode == 0
    proc = torchrun(2, "-m", "mtp_dist.evaluate", "humaneval", *common, "--output",
                    str(tmp_path / "dp"), timeout=300)  # fmt: skip
    assert "pass@1" in proc.stdout
    assert samples(tmp_path / "dp") == samples(tmp_path / "alone")
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("dp", "alone")]
    assert summaries[0] == summaries[1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num-samples", "0"], "--num-samples 0"),
        (["--num-samples", "4", "--temperature", "0.5", "--k", "1,5"], "pass@5 needs at least 5"),
        (["--num-samples", "3"], "identical greedy samples"),
        (["--temperature", "-1"], "--temperature -1.0"),
        (["--top-p", "2"], "--top-p 2.0"),
        (["--limit", "0"], "--limit 0"),
        (["--speculative", "5"], "K must be in 2..4"),
        (["--tensor", "2"], "--tensor 2 does not divide the 1 processes"),
    ],
)
def test_bad_input(setup, capsys, args, message):
    n4, _, problems = setup
    assert main(["humaneval", str(n4), "--problems", str(problems), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_bad_sources_and_problem_files(setup, tmp_path, capsys):
    n4, _, problems = setup
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "other.jsonl").write_text('{"question": "?"}\n')
    cases = [
        ([str(tmp_path / "notes.txt"), "--problems", str(problems)], "cannot be read"),
        ([str(n4), "--problems", str(tmp_path / "other.jsonl")], "not HumanEval's format"),
        ([str(n4)], "context of 64 tokens (model.seq_length)"),  # HumanEval's prompts: too long
    ]
    for args, message in cases:
        assert main(["humaneval", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_cli_help():
    for argv in (["--help"], ["humaneval", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
