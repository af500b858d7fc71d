"""The induction task (data_prep/induction.py) and its scorer (mtp_dist/evaluate/induction.py):
renaming keeps each function's code the same up to its local names; the corpus is the same for
the same seed; every name is two tokens under a tokenizer trained with the pieces as user
symbols (and not under one trained without); the scorer scores exactly the second token of
later occurrences (a hand-made example), 1.0 for a predictor handed the answer and about chance
for one that is not, on real held-out shards."""

from __future__ import annotations

import ast
import glob
import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_prep import induction as ind
from mtp_dist.errors import UserError
from mtp_dist.evaluate.induction import (
    InductionDataError,
    Pieces,
    first_half_positions,
    score_windows,
    scored_positions,
)

SOURCE = b"""\
import os

LIMIT = 3


class Box:
    def fill(self, items, *, size=2, **extra):
        total = 0
        for item in items:
            self.item = item
            total += len(str(item)) + size
        squares = [item * item for item in range(size)]
        report(total=total, size=len(squares), **extra)
        return total, self.item, lambda item: item + size


def walk(path):
    global LIMIT
    import json as codec
    found = []
    try:
        found = os.listdir(path)
    except OSError as error:
        print(error)
    LIMIT = len(found)
    return codec.dumps(found)


def lonely(value):
    return LIMIT
"""


def _renamed(seed=0):
    first = ["baj", "bez", "bij", "bip", "biw", "boj", "buj", "buk"]
    second = ["doj", "doz", "duf", "duj"]
    return ind.file_documents("pkg/mod.py", SOURCE, seed, first, second), first, second


def _names_back(tree: ast.AST, names: dict) -> str:
    """ast.dump with every renamed Name and arg given its old name back."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in names:
            node.id = names[node.id]
        elif isinstance(node, ast.arg) and node.arg in names:
            node.arg = names[node.arg]
    return ast.dump(tree)


def test_renaming_changes_only_local_names():
    docs, first, second = _renamed()
    assert [d["function"] for d in docs] == ["Box.fill", "walk"]  # lonely: no name twice
    fill, walk = docs
    assert sorted(fill["names"].values()) == [
        "extra", "item", "items", "self", "size", "squares", "total"
    ]  # fmt: skip
    assert sorted(walk["names"].values()) == ["found", "path"]  # not LIMIT, codec, error
    tree = ast.parse(SOURCE)
    originals = {
        "Box.fill": tree.body[2].body[0],
        "walk": tree.body[3],
    }
    for doc in docs:
        new_tree = ast.parse(doc["text"])  # still Python
        for new, old in doc["names"].items():
            assert new[:3] in first and new[3:] in second and len(new) == 6
            assert old not in {n.id for n in ast.walk(new_tree) if isinstance(n, ast.Name)}
        firsts = [new[:3] for new in doc["names"]]
        assert len(set(firsts)) == len(firsts)  # distinct first halves within a function
        # The same code up to the names: attributes, keywords and globals untouched.
        original = ast.Module(body=[originals[doc["function"]]], type_ignores=[])
        assert _names_back(new_tree, doc["names"]) == ast.dump(original)
        assert doc["occurrences"] == sum(doc["text"].count(new) for new in doc["names"])
    assert ".item = " in fill["text"] and "report(total=" in fill["text"]
    assert "except OSError as error" in walk["text"] and "global LIMIT" in walk["text"]


def test_renaming_is_seeded():
    assert _renamed(0)[0] == _renamed(0)[0]
    assert _renamed(0)[0] != _renamed(1)[0]


def test_pieces_absent_from_the_text():
    texts = [b"def bajdoj(): return BEZ", b"bip"]
    absent = ind.absent_pieces(texts)
    assert "baj" not in absent and "doj" not in absent and "bez" not in absent
    assert "bip" not in absent and "biw" in absent
    first, second = ind.name_pools(texts, 0, 10, 5)
    assert len(first) == 10 and len(second) == 5 and not set(first) & set(second)
    with pytest.raises(UserError, match="--first-names"):
        ind.name_pools(texts, 0, len(absent), 1)


def _pieces():
    """A made-up vocabulary: first halves 10, 11; second halves 20, 21; eod 2; chance 1/2."""
    first, second = np.zeros(30, dtype=bool), np.zeros(30, dtype=bool)
    first[[10, 11]] = True
    second[[20, 21]] = True
    return Pieces(first, second, eod_id=2, chance=0.5)


def test_scorer_scores_only_second_tokens_of_later_occurrences():
    # position:  0   1   2  3   4   5   6   7  8   9  10 11  12  13  14  15  16
    window = [21, 5, 10, 20, 6, 10, 20, 11, 21, 7, 11, 21, 2, 10, 21, 10, 21, 10]
    # 0: a second half whose first lies before the window; 2: first occurrence of (10, 20);
    # 5: its later occurrence; 7: first of (11, 21); 10: later; 12: eod, a new document
    # where 13 is a first occurrence although (10, 20) came before; 15: later; 17: the
    # window's last token (its second half is beyond the window).
    assert scored_positions(np.array(window), _pieces()).tolist() == [5, 10, 15]


def test_first_half_measure_scores_only_first_halves_a_repeated_pair_predicts():
    # position: 0   1   2   3   4   5   6   7   8   9  10  11  12 13  14  15  16  17  18  19
    window = [10, 20, 11, 21, 10, 20, 12, 21, 10, 20, 11, 21, 5, 2, 10, 20, 11, 21, 10, 20, 11]
    # 1: (10, 20) first seen, followed by 11; 5: followed by 12 this time, not scored, and from
    # then on ambiguous (9 not scored); 3: (11, 21) first seen; 13: eod, a new document;
    # 15, 17: first in this document; 19: (10, 20) followed by 11 before in this document.
    assert first_half_positions(np.array(window), _pieces()).tolist() == [19]
    assert first_half_positions(np.array([10, 20, 11, 21, 10, 20, 11]), _pieces()).tolist() == [5]


def test_scorer_refuses_names_that_are_not_two_tokens():
    with pytest.raises(InductionDataError, match="without its other half"):
        scored_positions(np.array([5, 10, 6, 10, 20]), _pieces())
    with pytest.raises(InductionDataError, match="without its other half"):
        scored_positions(np.array([5, 20, 6]), _pieces())
    with pytest.raises(InductionDataError, match="ends with token 20 and later with 21"):
        scored_positions(np.array([10, 20, 10, 21]), _pieces())


def test_score_counts_hits_at_scored_positions_only():
    window = np.array([10, 20, 7, 10, 20, 11, 21, 8])  # scored: position 3 only
    guess = np.zeros((1, 7), dtype=np.int64)
    guess[0, 3] = 20  # right at the scored position
    guess[0, 0], guess[0, 5] = 20, 21  # right, but at first occurrences: not counted
    losses = np.full((1, 7), 2.0)
    losses[0, 3] = 0.5
    r = score_windows([window], lambda w: (guess, losses), _pieces())
    assert (r["scored_occurrences"], r["induction_success"]) == (1, 1.0)
    assert r["head1_loss"] == pytest.approx(12.5 / 7, abs=1e-4) and r["scored_loss"] == 0.5
    assert r["chance"] == 0.5
    guess[0, 3] = 21
    r = score_windows([window], lambda w: (guess, losses), _pieces())
    assert r["induction_success"] == 0.0


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A small induction corpus, a tokenizer trained with the pieces as user symbols, and the
    held-out split's shards."""
    from data_prep.tokenize import TokenizeConfig, run_tokenize
    from data_prep.tokenizers import SentencePieceOptions, train_sentencepiece

    root = tmp_path_factory.mktemp("induction")
    info = ind.write_induction_corpus(str(root / "corpus"), 3, 0.4, 0.15, 2)
    lines = [
        line
        for path in sorted(glob.glob(str(root / "corpus/train/*.jsonl")))
        for doc in map(json.loads, open(path, encoding="utf-8"))
        for line in doc["text"].split("\n")
        if line.strip()
    ]
    opts = SentencePieceOptions(vocab_size=500, user_defined_symbols=info["first"] + info["second"])
    tok = train_sentencepiece(iter(lines), str(root / "tok"), opts)
    plain = train_sentencepiece(iter(lines), str(root / "plain"), SentencePieceOptions(500))
    heldout = sorted(glob.glob(str(root / "corpus/heldout/*.jsonl")))
    run_tokenize(TokenizeConfig(heldout, str(root / "heldout"), str(root / "tok.model"),
                                progress=False))  # fmt: skip
    return root, info, tok, plain


def test_corpus_is_reproducible(task, tmp_path):
    root, info, _, _ = task
    again = ind.write_induction_corpus(str(tmp_path), 3, 0.4, 0.15, 2)
    assert again == info
    for path in glob.glob(str(root / "corpus/**/*.jsonl"), recursive=True):
        rel = path[len(str(root / "corpus")) :]
        assert open(path, "rb").read() == open(str(tmp_path) + rel, "rb").read()
    assert info["documents"]["heldout"] > 10 and info["chance"] == 1 / len(info["second"])
    other = ind.write_induction_corpus(str(tmp_path / "other"), 4, 0.4, 0.15, 2)
    assert other["corpus_sha256"] != info["corpus_sha256"]


def test_names_are_two_tokens_only_with_user_symbols(task):
    root, info, tok, plain = task
    files = sorted(glob.glob(str(root / "corpus/*/*.jsonl")))
    assert ind.check_two_tokens(tok, info, files) == sum(info["name_occurrences"].values())
    with pytest.raises(UserError, match="not one token"):
        ind.check_two_tokens(plain, info, files)


def test_copy_control_repeats_each_line_and_scores_only_the_repeat(task, tmp_path):
    """induction-copy: the same seed gives the same files; its pools are drawn from the
    corpus's; every name is two tokens under the corpus's tokenizer; a document's second line
    is its first, and the scorer scores exactly the repeat's names."""
    root, info, tok, _ = task
    copy = ind.write_copy_corpus(str(root / "corpus"), str(tmp_path / "a"), 1, 20, 5, 8, 6)
    again = ind.write_copy_corpus(str(root / "corpus"), str(tmp_path / "b"), 1, 20, 5, 8, 6)
    files = sorted(glob.glob(str(tmp_path / "a/*/*.jsonl")))
    for path in files:
        assert open(path, "rb").read() == open(path.replace("/a/", "/b/"), "rb").read()
    assert {k: v for k, v in copy.items() if k != "corpus"} == {
        k: v for k, v in again.items() if k != "corpus"
    }
    assert set(copy["first"]) <= set(info["first"]) and len(copy["first"]) == 8
    assert set(copy["second"]) <= set(info["second"]) and copy["chance"] == 1 / 8
    assert ind.check_two_tokens(tok, copy, files) == 25 * 2 * 6
    doc = json.loads(open(files[0], encoding="utf-8").readline())
    line, repeat = doc["text"].split("\n")
    assert line == repeat and len(line) == 6 * 6  # six names of two 3-letter pieces
    tokens = np.array([*tok.encode_batch([doc["text"]])[0].tolist(), tok.eod_id])
    pieces = Pieces.of(tok, copy)
    first_halves = np.flatnonzero(pieces.first[tokens])
    assert scored_positions(tokens, pieces).tolist() == first_halves[6:].tolist()
    with pytest.raises(UserError, match="--pool 99"):
        ind.write_copy_corpus(str(root / "corpus"), str(tmp_path / "c"), pool=99)


def test_each_measure_sees_its_own_kind_of_copying(task, tmp_path):
    """On copy-control documents: copying the token after the last earlier occurrence of the
    current token completes every second half (the paper's measure: 1.0) but not every first
    half; copying after the last earlier occurrence of the current pair completes every first
    half the second measure scores (1.0)."""
    root, _, tok, _ = task
    copy = ind.write_copy_corpus(str(root / "corpus"), str(tmp_path), 3, 30, 5, 8, 6)
    pieces = Pieces.of(tok, copy)
    texts = [json.loads(line)["text"] for line in open(glob.glob(str(tmp_path / "train/*"))[0])]
    stream = [t for ids in tok.encode_batch(texts) for t in [*ids.tolist(), tok.eod_id]]
    windows = [np.array(stream[i : i + 65]) for i in range(0, len(stream) - 65, 65)]

    def copier(context: int):
        def predict(batch):
            out = np.zeros((len(batch), batch.shape[1] - 1), dtype=np.int64)
            for b, w in enumerate(batch.tolist()):
                for t in range(context - 1, len(w) - 1):
                    now = w[t - context + 1 : t + 1]
                    earlier = [
                        u for u in range(context - 1, t) if w[u - context + 1 : u + 1] == now
                    ]
                    out[b, t] = w[earlier[-1] + 1] if earlier else 0
            return out, np.zeros(out.shape)

        return predict

    by_token, by_pair = (score_windows(windows, copier(c), pieces) for c in (1, 2))
    assert by_token["induction_success"] == 1.0 and by_pair["first_half_success"] == 1.0
    assert by_token["first_half_scored"] == by_pair["first_half_scored"] > 100
    assert by_token["first_half_success"] < 0.9


def _windows(root, tok, length):
    from mtp_dist.evaluate.heads import held_out_windows

    return list(held_out_windows(root / "heldout", "all", "1,0,0", 500, tok.identity_hash, length))


def test_metric_is_one_with_the_answer_and_chance_without(task):
    """On real held-out windows: a predictor that looks the name up earlier in the document
    (handed the answer) scores 1.0; one that guesses a second half uniformly scores about
    1 / |second pool|, within 4 standard errors."""
    root, info, tok, _ = task
    pieces = Pieces.of(tok, info)
    windows = _windows(root, tok, 65)
    second_ids = np.flatnonzero(pieces.second)
    rng = random.Random(0)

    def copy_earlier(batch):
        out = np.zeros((len(batch), batch.shape[1] - 1), dtype=np.int64)
        for b, w in enumerate(batch):
            for t in range(len(w) - 1):
                earlier = [u for u in range(t) if w[u] == w[t] and tok.eod_id not in w[u:t]]
                out[b, t] = w[earlier[-1] + 1] if earlier else 0
        return out, np.zeros(out.shape)

    def guess(batch):
        out = np.array([[rng.choice(second_ids) for _ in w[:-1]] for w in batch])
        return out, np.zeros(out.shape)

    handed = score_windows(windows, copy_earlier, pieces)
    assert handed["induction_success"] == 1.0 and handed["scored_occurrences"] > 200
    blind = score_windows(windows, guess, pieces)
    n, p = blind["scored_occurrences"], pieces.chance
    assert n == handed["scored_occurrences"]
    assert abs(blind["induction_success"] - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-4


def test_benchmark_end_to_end(tmp_path):
    """benchmarks/induction.py on a tiny grid: the verb's corpus, the tokenizer with the pieces
    as symbols, shards, the trainer (n=1 and n=2, parameter-matched), every checkpoint scored
    by `evaluate induction`; table, JSON and PNG written. Checks the pipeline, not the result."""
    import subprocess
    import sys

    from tests.support import ROOT

    out = tmp_path / "induction.json"
    grid = [sys.executable, "benchmarks/induction.py", "--workdir", str(tmp_path / "w"),
            "--widths", "32", "--seeds", "1", "--tokens", "4096", "--seq", "64", "--evals", "2",
            "--corpus-mb", "0.3", "--vocab", "500", "--max-windows", "16",
            "--out", str(out)]  # fmt: skip
    proc = subprocess.run(grid, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "| 32 | 0.07M | 1 | 0 |" in proc.stdout and "| 32 | 0.07M | 2 | 0 |" in proc.stdout
    r = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 10_000
    data = r["data"]
    assert data["two_token_occurrences_checked"] == sum(data["name_occurrences"].values())
    assert (data["chance"], data["first_chance"]) == (1 / 32, 1 / 64)
    n1, n2 = r["runs"]
    assert (n1["n"], n2["n"]) == (1, 2)
    assert n1["non_embedding_params"] == n2["non_embedding_params"]  # num_layers = L - n
    for run in (n1, n2):
        assert [p["step"] for p in run["curve"]] == [2, 4] and run["tokens"] == 4 * 16 * 64
        for p in run["curve"]:
            assert p["scored"] > 0 and 0 <= p["induction_success"] <= 1
            assert p["first_half_success"] is None or 0 <= p["first_half_success"] <= 1
            assert 0 < p["head1_loss"] < 10  # ln(500) = 6.2 at the start
    assert {(s["n"], s["seeds"]) for s in r["summary"]} == {(1, 1), (2, 1)}
    assert [(p["width"], p["pairs"]) for p in r["pairs"]] == [(32, 1)]
    assert "| width | pairs | n=2 first | n=1 first | neither | p |" in proc.stdout

    # Rescoring (a run's induction.json deleted) does not retrain, keeps the training cost, and
    # scores the scheduled checkpoints only, not one a stopped run saved when it was stopped.
    run_dir = next((tmp_path / "w" / "runs").glob("d32-n1-seed0-*"))
    shutil.copytree(
        run_dir / "checkpoints" / "step_00000002", run_dir / "checkpoints" / "step_00000003"
    )
    (run_dir / "induction.json").unlink()
    train_log = (run_dir / "train.log").read_text()
    proc = subprocess.run(grid, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    again = json.loads(out.read_text())["runs"][0]
    assert [p["step"] for p in again["curve"]] == [2, 4]
    assert again["train_cpu_seconds"] == n1["train_cpu_seconds"]
    assert again["curve"] == n1["curve"]  # the same checkpoints, scored the same
    assert (run_dir / "train.log").read_text() == train_log

    # A run killed (kill -9) while training, its last checkpoint step 2, resumes: the same
    # curve as the straight run. Its recorded part is left running, so its cost restarts: that
    # of the steps after 2, in one part.
    run_dir = next((tmp_path / "w" / "runs").glob("d32-n2-seed0-*"))
    shutil.rmtree(run_dir / "checkpoints" / "step_00000004")
    (run_dir / "checkpoints" / "latest").write_text("step_00000002\n")
    for name in ("induction.json", "train_cost.json"):
        (run_dir / name).unlink()
    spent = json.loads((run_dir / "train_spent.json").read_text())
    assert (spent["parts"], spent["running"], spent["from_step"]) == (1, False, 0)
    (run_dir / "train_spent.json").write_text(json.dumps({**spent, "running": True}))
    # An earlier stop's off-schedule checkpoint, older than `latest`: removed on the resume.
    stale = run_dir / "checkpoints" / "step_00000001"
    shutil.copytree(run_dir / "checkpoints" / "step_00000002", stale)
    proc = subprocess.run(grid, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert not stale.exists()
    resumed = json.loads(out.read_text())["runs"][1]
    assert resumed["curve"] == n2["curve"]
    assert n2["trained_from_step"] == 0 and resumed["trained_from_step"] == 2
    assert json.loads((run_dir / "train_cost.json").read_text())["parts"] == 1
    assert "eta ?" in proc.stdout and "[2/2]" in proc.stdout  # the reused run, then this one

    # A run whose `latest` pointer is damaged: one error line naming it, exit 2, at once. The
    # grid now has a second seed, whose runs are queued or in flight when the error comes:
    # stopped or never started, neither finishes (before, the grid ran both before reporting).
    (run_dir / "checkpoints" / "latest").write_bytes(b"\x00garbage")
    for name in ("induction.json", "train_cost.json"):
        (run_dir / name).unlink()
    two_seeds = [*grid[: grid.index("--seeds") + 1], "2", *grid[grid.index("--seeds") + 2 :]]
    proc = subprocess.run(two_seeds, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "latest is corrupt" in last, last
    runs = tmp_path / "w" / "runs"
    assert not any((d / "induction.json").exists() for d in runs.glob("d32-n*-seed1-*"))

    # The copy control through the same grid: the corpus and tokenizer above are reused.
    copy = tmp_path / "copy.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/induction.py", "--workdir", str(tmp_path / "w"),
         "--task", "copy", "--widths", "32", "--seeds", "1", "--tokens", "4096", "--seq", "64",
         "--batch", "16", "--evals", "2", "--vocab", "500", "--max-windows", "16",
         "--copy-docs", "200", "--out", str(copy)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    r = json.loads(copy.read_text())
    assert r["grid"] == "copy (customised)"
    assert r["data"]["chance"] == r["data"]["first_chance"] == 1 / 16
    assert r["data"]["two_token_occurrences_checked"] == 2 * 15 * (200 + 600)
    for run in r["runs"]:
        assert [p["step"] for p in run["curve"]] == [2, 4] and run["tokens"] == 4 * 16 * 64
        assert all(p["scored"] > 0 and p["first_scored"] > 0 for p in run["curve"])

    _stopped_by_signals_then_resumed(grid, tmp_path / "w" / "runs")


def _stopped_by_signals_then_resumed(grid: list[str], runs: Path) -> None:
    """A 100-step run (checkpoints every 25) stopped twice by SIGTERM, then finished.
    1. SIGTERM to its trainer alone, which saves and exits 0, as on a preemption: the grid
       does not take the run for finished (before, it recorded it and scored the checkpoints
       it had), and says where it stopped.
    2. SIGTERM to the grid script: it stops its trainer, which saves; the part's cost is
       recorded; one error line, exit 143 (before, the script died at once and the part's
       cost was lost).
    3. A rerun resumes and finishes it: every scheduled checkpoint scored, three parts' cost."""
    import signal
    import subprocess
    import time

    import psutil

    from tests.support import ROOT, kill_tree

    cmd = [*grid, "--ns", "1", "--evals", "4"]
    cmd[cmd.index("--tokens") + 1] = str(100 * 16 * 64)
    before = set(runs.iterdir())

    def run_until(step: int) -> tuple[subprocess.Popen, Path, psutil.Process]:
        """Start the grid; return once its trainer has committed checkpoint `step`."""
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)  # fmt: skip
        end = time.time() + 300
        while time.time() < end and proc.poll() is None:
            new = [d for d in runs.iterdir() if d not in before]
            latest = new[0] / "checkpoints" / "latest" if new else None
            if latest and latest.exists() and latest.read_text().strip() >= f"step_{step:08d}":
                trainer = next(c for c in psutil.Process(proc.pid).children()
                               if "mtp_dist.train" in c.cmdline())  # fmt: skip
                return proc, new[0], trainer
            time.sleep(0.2)
        kill_tree(proc.pid)
        raise AssertionError(f"no checkpoint {step}: {proc.communicate()}")

    def finish(proc) -> tuple[int, str]:
        try:
            _, err = proc.communicate(timeout=300)
        finally:
            kill_tree(proc.pid)
        return proc.returncode, err

    def spent(run_dir) -> dict:
        return json.loads((run_dir / "train_spent.json").read_text())

    proc, run_dir, trainer = run_until(25)
    trainer.send_signal(signal.SIGTERM)
    code, err = finish(proc)
    last = err.strip().splitlines()[-1]
    assert code == 1 and "training stopped at step" in last and "of 100" in last, err[-3000:]
    assert not (run_dir / "train_cost.json").exists()
    assert not (run_dir / "induction.json").exists()
    assert (spent(run_dir)["parts"], spent(run_dir)["running"]) == (1, False)

    proc, _, trainer = run_until(50)
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: stopped by SIGTERM") and "rerun" in last, last
    assert not trainer.is_running()
    assert "received SIGTERM on some rank: saving" in (run_dir / "train.log").read_text()
    second = spent(run_dir)
    assert (second["parts"], second["running"]) == (2, False) and second["cpu"] > 0
    assert not (run_dir / "train_cost.json").exists()

    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    done = json.loads((run_dir / "induction.json").read_text())
    assert [p["step"] for p in done["curve"]] == [25, 50, 75, 100]
    assert done["trained_from_step"] == 0
    cost = json.loads((run_dir / "train_cost.json").read_text())
    assert cost["parts"] == 3 and cost["cpu"] > second["cpu"]


def test_a_signal_during_data_preparation_stops_its_command(tmp_path):
    """SIGTERM to the grid while it prepares the data (in its main thread): the command in
    flight is stopped and waited for, not left running; one error line, exit 143."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from tests.support import ROOT, kill_tree

    cmd = [sys.executable, "benchmarks/induction.py", "--workdir", str(tmp_path / "w"),
           "--widths", "32", "--seeds", "1", "--tokens", "4096", "--seq", "64", "--evals", "2",
           "--corpus-mb", "0.3", "--vocab", "500", "--out", str(tmp_path / "o.json")]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        end, children = time.time() + 120, []
        while not children and time.time() < end and proc.poll() is None:
            time.sleep(0.1)
            children = psutil.Process(proc.pid).children()
        assert children, "the grid started no data preparation command"
        assert "induction-corpus" in children[0].cmdline()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("error: stopped by SIGTERM"), err[-3000:]
    assert not children[0].is_running()
    assert not (tmp_path / "w" / "data" / "corpus" / "names.json").exists()


def test_scorer_bad_input_is_one_error_line(tmp_path, capsys):
    from mtp_dist.evaluate.cli import main

    names = tmp_path / "names.json"
    names.write_text("{}")
    code = main(["induction", str(tmp_path), "--data", str(tmp_path), "--names", str(names)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: {names} is not an induction corpus's names.json")
    assert "data_prep induction-corpus" in err[0]


def _bench():
    """benchmarks/induction.py as a module (benchmarks/ is not a package)."""
    import importlib.util

    from tests.support import ROOT

    spec = importlib.util.spec_from_file_location(
        "induction_bench", ROOT / "benchmarks/induction.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_a_stopped_part_s_cost_is_kept(tmp_path):
    """The grid adds every training command's CPU and wall seconds to the run's record, a
    command that fails or is stopped included (before, a resumed run's cost was only its
    last part's); a part in flight is marked running, so a kill -9 shows."""
    import sys

    bench = _bench()
    spent = tmp_path / "train_spent.json"
    spent.write_text('{"cpu": 0.0, "wall": 0.0, "parts": 0, "running": false, "from_step": 0}')
    fail = [sys.executable, "-c", "sum(range(3_000_000)); raise SystemExit(3)"]
    with pytest.raises(SystemExit, match=r"failed \(3\)"):
        bench._run(fail, tmp_path / "a.log", spent=spent)
    first = json.loads(spent.read_text())
    assert first["parts"] == 1 and first["cpu"] > 0 and first["wall"] > 0
    assert first["running"] is False and first["from_step"] == 0
    # This one waits (10 s at most) to see itself marked running, then exits 0.
    running = f"json.load(open({str(spent)!r}))['running']"
    wait = (f"import json, time; sum(range(3_000_000)); end = time.time() + 10\n"
            f"while not {running} and time.time() < end:\n    time.sleep(0.01)\n"
            f"raise SystemExit(0 if {running} else 4)")  # fmt: skip
    cpu = bench._run([sys.executable, "-c", wait], tmp_path / "b.log", spent=spent)
    second = json.loads(spent.read_text())
    assert second["parts"] == 2 and second["running"] is False
    assert second["cpu"] == pytest.approx(first["cpu"] + cpu, abs=0.11)
    # Damaged by hand (the grid writes it atomically): one error line with the fix.
    for damaged in ("{not json", "[]"):
        spent.write_text(damaged)
        with pytest.raises(UserError, match=r"train_spent.json is damaged .*: delete it and rerun"):
            bench._add_spent(spent, 1.0, 1.0)


def test_pairs_and_sign_test_of_which_learned_first(tmp_path):
    """The grid's seed-by-seed comparison on hand-made curves: n=2 first when it crosses 0.5
    (either measure) at an earlier checkpoint, a run that never does counts as later than one
    that does, the same checkpoint or neither learning is undecided; p is the one-sided sign
    test (3 of 3 decided pairs n=2 first: 1/8)."""
    bench = _bench()

    def run(n, seed, first_half, paper=(0.03, 0.03, 0.03)):
        curve = [{"tokens": t, "first_half_success": f, "induction_success": s}
                 for t, f, s in zip((10, 20, 30), first_half, paper, strict=True)]  # fmt: skip
        return {"width": 32, "n": n, "seed": seed, "curve": curve}

    never = (0.0, 0.01, None)
    results = [
        run(1, 0, (0.0, 0.1, 0.6)), run(2, 0, (0.0, 0.6, 0.6)),  # n=2 at 20, n=1 at 30
        run(1, 1, never), run(2, 1, never, paper=(0.0, 0.0, 0.9)),  # n=2 by the paper's measure
        run(1, 2, never), run(2, 2, (0.7, 0.7, 0.7)),
        run(1, 3, never), run(2, 3, never),  # neither learned
        run(1, 4, (0.0, 0.5, 0.5)), run(2, 4, (0.0, 0.5, 0.5)),  # the same checkpoint
        run(1, 5, (0.0, 0.0, 0.0)),  # no n=2 partner: not a pair
    ]  # fmt: skip
    [row] = bench.paired(results)
    assert row == {"width": 32, "pairs": 5, "n2_first": 3, "n1_first": 0, "neither": 2,
                   "sign_test_p": 1 / 8}  # fmt: skip
    # The paper's measure alone: only seed 1's n=2 learned it (at 30).
    [row] = bench.paired(results, ("induction_success",))
    assert (row["n2_first"], row["n1_first"], row["neither"]) == (1, 0, 4)
    # A second width: the table's last row pools the pairs of both (6 of 6 decided: 1/64).
    wider = [{**r, "width": 64} for r in results]
    table = bench.pairs_table(bench.paired(results + wider), "either measure")
    assert table[-1] == "| all | 10 | 6 | 0 | 4 | 0.0156 |"
    results.append(run(2, 5, never))  # now a pair, n=1 never learned either
    results[0:2] = [run(1, 0, (0.6, 0.6, 0.6)), run(2, 0, never)]  # n=1 first
    [row] = bench.paired(results)
    assert (row["n2_first"], row["n1_first"], row["neither"]) == (2, 1, 3)
    assert row["sign_test_p"] == 4 / 8  # P(at least 2 of 3 heads)

    # The figure takes curves of different lengths (a run that lost an early checkpoint).
    for r in results:
        r.update(non_embedding_params=70_000, head1_loss=3.0, induction_success=0.03,
                 first_half_success=r["curve"][-1]["first_half_success"])  # fmt: skip
    results[-1]["curve"] = results[-1]["curve"][1:]
    png = tmp_path / "pairs.png"
    bench.plot(results, bench.summarise(results), 1 / 32, 1 / 64, png)
    assert png.stat().st_size > 10_000


def test_gpu_grid_stops_at_its_deadline_scores_what_was_reached_and_resumes(tmp_path):
    """benchmarks/gpu/induction_grid.py (run here on the CPU, as in CI): the data made with
    --prepare-only; every run stopped at the deadline saves, its scheduled checkpoints reached
    are scored, each width compared at the last checkpoint all its runs reached; a rerun resumes
    every run (an earlier stop's checkpoint removed), --report reprints the tables. Checks the
    pipeline, not the result."""
    import signal
    import subprocess
    import sys
    import time

    from tests.support import ROOT

    out, work = tmp_path / "gpu.json", tmp_path / "g"
    small = ["--workdir", str(work), "--widths", "32", "--seeds", "1", "--seq", "64",
             "--vocab", "500", "--max-windows", "16", "--corpus-mb", "0.3"]  # fmt: skip
    script = [sys.executable, "benchmarks/gpu/induction_grid.py"]

    def grid(*extra, seconds="12"):
        # 4,000 steps of 1,024 tokens: far more than the deadline allows; a checkpoint each 10.
        cmd = [*script, *small, "--tokens", "4096000", "--evals", "400", "--train-seconds",
               seconds, "--out", str(out), *extra]  # fmt: skip
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)

    proc = grid()
    assert proc.returncode == 2 and proc.stderr.startswith("error: "), proc.stderr[-2000:]
    assert "missing: run this script with --prepare-only" in proc.stderr
    proc = grid("--prepare-only")
    assert proc.returncode == 0, proc.stderr[-3000:]

    proc = grid()
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "stopped 2 of 2 runs at the deadline" in proc.stdout
    first = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 10_000
    for r in first["runs"]:
        assert not r["finished"] and 10 <= r["steps_trained"] < r["steps"] == 4000
        steps = [p["step"] for p in r["curve"]]
        assert steps == list(range(10, 10 * len(steps) + 1, 10))  # scheduled ones only
        assert r["resumed_from_step"] == 0
    common = min(r["curve"][-1]["tokens"] for r in first["runs"])
    assert first["compared_at_tokens"] == {"32": common}
    assert f"d=32: compared at {common / 1e6:.2f}M tokens" in proc.stdout
    assert "the paper's measure alone" in proc.stdout and first["pairs_paper_measure"]

    # The rerun resumes each run from the checkpoint its stop saved; an earlier stop's
    # checkpoint, off the schedule and older than that one, is removed first (it would take a
    # kept slot); the curve keeps every earlier point.
    stale = []
    for run_dir in (work / "runs").iterdir():
        stale.append(run_dir / "checkpoints" / "step_00000001")
        shutil.copytree(run_dir / "checkpoints" / "step_00000010", stale[-1])
    proc = grid(seconds="8")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    again = json.loads(out.read_text())
    for before, after in zip(first["runs"], again["runs"], strict=True):
        assert after["resumed_from_step"] == before["steps_trained"]
        assert after["steps_trained"] > before["steps_trained"]
        assert after["curve"][: len(before["curve"])] == before["curve"]
    assert not any(c.exists() for c in stale)

    # SIGTERM to the script while its trainers run: each saves a checkpoint past where it was,
    # none is left running, exit 143 with one error line, nothing scored or written.
    def steps(run_dir):
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"]

    run_dirs = sorted((work / "runs").iterdir())
    was = {d: steps(d) for d in run_dirs}
    cmd = [*script, *small, "--tokens", "4096000", "--evals", "400", "--train-seconds", "600",
           "--out", str(out)]  # fmt: skip
    stopped = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)  # fmt: skip
    wait_until = time.time() + 120
    while time.time() < wait_until and not all(steps(d) > was[d] for d in run_dirs):
        time.sleep(0.5)
    stopped.send_signal(signal.SIGTERM)
    _, err = stopped.communicate(timeout=180)
    assert stopped.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("error: stopped by SIGTERM"), err[-2000:]

    def cmdline(path):
        try:
            return path.read_bytes().decode(errors="replace")
        except OSError:  # a process that has just ended
            return ""

    assert not [p for p in Path("/proc").glob("[0-9]*/cmdline") if str(work) in cmdline(p)]
    for d in run_dirs:
        latest = (d / "checkpoints" / "latest").read_text().strip()
        assert int(latest.removeprefix("step_")) > was[d]
    assert json.loads(out.read_text()) == again

    proc = subprocess.run([*script, "--report", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| 32 | 0.07M | 2 | 0 |" in proc.stdout and "the paper's measure alone" in proc.stdout
    other = tmp_path / "other.json"  # a JSON, but not this script's: one error line, exit 2
    other.write_text('{"runs": []}')
    proc = subprocess.run([*script, "--report", str(other)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: --report {other}: not a JSON of this script (it needs runs, chance and "
        "first_chance): give its --out"
    ]
