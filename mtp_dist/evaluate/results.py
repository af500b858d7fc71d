"""An evaluation's output directory: run.json (the model and the settings its samples belong
to), samples.jsonl (one line per sample, appended and synced as they are checked, so a killed
evaluation loses at most the batch in flight) and summary.json. A rerun continues where the
last one stopped and refuses a directory whose samples belong to another model or to other
settings, naming what differs; two evaluations never share a directory (a lock)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mtp_dist.errors import UserError
from mtp_dist.files import DirectoryLock, atomic_write_json, fsync_dir


def _differences(old, new, where: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{where}.{key}" if where else key)
        return out
    return [] if old == new else [f"{where}: {old!r} there, {new!r} now"]


class RunDir:
    def __init__(self, directory: str | os.PathLike, header: dict, main: bool = True):
        """header: what the samples belong to (JSON); main: this process writes (rank 0); the
        others only read what is done."""
        self.dir = Path(directory)
        self.header = header
        self.main = main
        self.samples = self.dir / "samples.jsonl"
        self.lock = DirectoryLock(self.dir, "evaluations") if main else None

    def open(self) -> dict[tuple[str, int], dict]:
        """The samples already done, by (task_id, sample index)."""
        if self.main:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
        run = self.dir / "run.json"
        if run.exists():
            try:
                old = json.loads(run.read_text())
            except json.JSONDecodeError as e:
                raise UserError(f"{run} is not JSON ({e.msg}): give another --output") from e
            differences = _differences(old, self.header)
            if differences:
                raise UserError(
                    f"{self.dir} holds samples of another model or other settings "
                    f"({'; '.join(differences)}): give another --output, or remove {self.dir} "
                    "to start again"
                )
        elif self.samples.exists():
            raise UserError(
                f"{self.samples} exists without its {run.name}: it was not written by this "
                "command; give another --output"
            )
        elif self.main:
            atomic_write_json(run, self.header)
        return self._read()

    def _read(self) -> dict[tuple[str, int], dict]:
        done = {}
        if not self.samples.exists():
            return done
        data = self.samples.read_bytes()
        good = 0  # bytes of complete lines
        for number, line in enumerate(data.split(b"\n"), 1):
            if good + len(line) >= len(data):  # the last piece, without its newline
                break  # written when the run was killed: dropped, its sample is redone
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(
                    f"{self.samples}:{number} is not JSON ({e.msg}): the file was changed by "
                    "hand; remove the line (its sample is redone) or give another --output"
                ) from e
            done[(record["task_id"], record["sample"])] = record
            good += len(line) + 1
        if self.main and good < len(data):
            with open(self.samples, "r+b") as f:
                f.truncate(good)
        return done

    def append(self, records: list[dict]) -> None:
        if not self.main:
            return
        with open(self.samples, "a", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self.dir)

    def write_summary(self, summary: dict) -> None:
        if self.main:
            atomic_write_json(self.dir / "summary.json", summary)

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
