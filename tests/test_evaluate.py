"""HumanEval without a model: the unbiased pass@k estimator against hand-worked values; the 164
packaged problems and the refusal of a file of another format; completions cut at the stop
sequences; and execution: every canonical solution passes (pass@1 = 1.0), empty and wrong
completions fail, and a completion that loops, exits, allocates, prints or deletes a file is
contained in its own process and counted failed, the file intact."""

from __future__ import annotations

import gzip
import json
import time

import pytest

from mtp_dist.errors import UserError
from mtp_dist.evaluate.execution import check_completions, run_program
from mtp_dist.evaluate.humaneval import PROBLEMS, cut_completion, read_problems
from mtp_dist.evaluate.passk import mean_pass_at_k, pass_at_k


def test_pass_at_k_by_hand():
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 1, 5) == pytest.approx(1 - 126 / 252)  # 1 - C(9,5)/C(10,5)
    assert pass_at_k(4, 0, 3) == 0.0
    assert pass_at_k(3, 2, 2) == 1.0  # any 2 of 3 hold a correct one
    assert pass_at_k(200, 200, 100) == 1.0
    # Large n, where the binomials themselves would overflow a float: 1 - C(190,100)/C(200,100).
    assert pass_at_k(200, 10, 100) == pytest.approx(1 - 0.5**10, rel=0.01)
    assert mean_pass_at_k([(5, 2), (5, 0), (5, 5)], 1) == pytest.approx((0.4 + 0 + 1) / 3)
    for bad in ((5, 6, 1), (5, 2, 0), (5, 2, 6)):
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_the_packaged_problems():
    problems = read_problems()
    assert len(problems) == PROBLEMS
    assert problems[0].task_id == "HumanEval/0" and problems[-1].task_id == "HumanEval/163"
    assert all(f"def {p.entry_point}(" in p.prompt for p in problems)  # the function to write


def test_a_problem_file_of_another_format(tmp_path):
    good = {"task_id": "a", "prompt": "", "canonical_solution": "", "test": "", "entry_point": "f"}
    cases = {
        "notjson.jsonl": "{not json\n",
        "missing.jsonl": json.dumps({**good, "test": None}) + "\n",
        "twice.jsonl": (json.dumps(good) + "\n") * 2,
        "empty.jsonl": "\n",
    }
    messages = [
        "notjson.jsonl:1 is not JSON",
        "missing.jsonl:1 lacks",
        "task_id twice",
        "no problems",
    ]
    for (name, text), message in zip(cases.items(), messages, strict=True):
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError, match=message):
            read_problems(tmp_path / name)
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(UserError, match="cannot be read as HumanEval problems"):
        read_problems(tmp_path / "bad.jsonl.gz")
    with gzip.open(tmp_path / "one.jsonl.gz", "wt") as f:
        f.write(json.dumps(good) + "\n")
    assert [p.task_id for p in read_problems(tmp_path / "one.jsonl.gz")] == ["a"]


def test_completions_cut_at_the_stop_sequences():
    body = (
        "    x = 1\n    def inner():\n        # a comment\n        return x\n    return inner()\n"
    )
    assert cut_completion(body) == body  # indented: still the function's body
    assert cut_completion(body + "\ndef other():\n    pass\n") == body
    assert cut_completion(body + "\nif __name__ == '__main__':\n") == body
    assert cut_completion(body + "\n# tests\nprint(1)\n") == body
    assert cut_completion("    return 1\nclass A:\n") == "    return 1"
    assert cut_completion("") == ""


def test_canonical_solutions_pass_and_empty_or_wrong_completions_fail():
    """All 164 canonical solutions, in parallel processes: pass@1 = 1.0. Empty completions and
    wrong ones (another problem's canonical solution) on a quarter of the problems: 0."""
    problems = read_problems()
    start = time.perf_counter()
    outcomes = check_completions([(p, p.canonical_solution) for p in problems], timeout=10)
    seconds = time.perf_counter() - start
    assert [o.error for o in outcomes] == [None] * PROBLEMS, seconds
    assert mean_pass_at_k([(1, int(o.passed)) for o in outcomes], 1) == 1.0
    some = problems[::4]
    wrong = [(p, problems[(i * 4 + 1) % PROBLEMS].canonical_solution) for i, p in enumerate(some)]
    outcomes = check_completions([(p, "") for p in some] + wrong, timeout=10)
    assert not any(o.passed for o in outcomes)
    assert mean_pass_at_k([(1, int(o.passed)) for o in outcomes], 1) == 0.0


def test_careless_completions_are_contained(tmp_path):
    """Each runs in its own process under limits and fails with its own error class; a
    completion that would delete or overwrite a file of the run leaves it intact."""
    problem = read_problems()[0]
    precious = tmp_path / "precious.txt"
    precious.write_text("keep")
    cases = {
        "    while True:\n        pass\n": "Timeout",
        "    import sys\n    sys.exit(0)\n": "SystemExit",
        "    import os\n    os._exit(0)\n": "Exited",
        "    raise SystemExit\n": "SystemExit",
        "    x = bytearray(8 << 30)\n": "MemoryError",
        f"    import os\n    os.remove({str(precious)!r})\n": "TypeError",
        f"    open({str(precious)!r}, 'w').write('gone')\n": "PermissionError",
        "    import shutil\n    shutil.rmtree('/')\n": "TypeError",
        "    print('passed')\n    return True\n": "AssertionError",
        "    return [\n": "SyntaxError",
    }
    start = time.perf_counter()
    outcomes = check_completions([(problem, c) for c in cases], timeout=2, workers=2)
    seconds = time.perf_counter() - start
    assert [o.error for o in outcomes] == list(cases.values())
    assert not any(o.passed for o in outcomes)
    assert precious.read_text() == "keep"
    assert seconds < 30, "the looping completion was stopped at its timeout"
    # A file written inside its own working directory is fine (and removed with it).
    ok = problem.canonical_solution + "\nopen('scratch.txt', 'w').write('x')\n"
    assert run_program(problem.program(ok)).passed
