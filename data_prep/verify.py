"""The `verify` command: every shard of an output directory against its manifest.

Training checks what is cheap (headers and sizes, the .idx, token ids as they are read); this
reads every byte, so it finds what those cannot: a .bin whose content changed at the same size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from data_prep import manifest as mf
from data_prep.shard_index import ShardError, check_index, open_index
from mtp_dist.errors import UserError


class VerifyFailed(UserError):
    """Some shards are bad or missing; the message lists them and says how to redo them."""


@dataclass
class Report:
    out_dir: str
    rows: list[tuple[str, str, str]] = field(default_factory=list)
    """(shard, status, detail); status is ok, skipped, bad or missing."""

    @property
    def bad(self) -> list[str]:
        return [name for name, status, _ in self.rows if status in ("bad", "missing")]

    def raise_if_bad(self) -> None:
        bad = self.bad
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise VerifyFailed(
                f"{self.out_dir}: {len(bad)} of {len(self.rows)} shards are bad or missing "
                f"({shown}): remove the bad shards' .json files and rerun `python -m data_prep "
                "tokenize` with the same arguments to redo them"
            )


def verify_directory(out_dir: str) -> Report:
    manifest = mf.load_manifest(out_dir)
    report = Report(out_dir)
    recorded = {s["shard"]: s for s in manifest["shards"]}
    expected = manifest.get("expected_shards") or sorted(recorded)
    for name in sorted(set(expected) | set(recorded)):
        sidecar = recorded.get(name)
        if sidecar is None:
            report.rows.append((name, "missing", "not tokenized yet"))
        elif sidecar.get("status") == "skipped":
            report.rows.append((name, "skipped", sidecar.get("error", "bad input")))
        else:
            problem = shard_problem(out_dir, sidecar)
            report.rows.append((name, "bad" if problem else "ok", problem or sidecar["sha256"]))
    return report


def shard_problem(out_dir: str, sidecar: dict) -> str | None:
    """What is wrong with a complete shard's files, or None."""
    prefix = mf.shard_prefix(out_dir, sidecar["shard"])
    for ext in ("bin", "idx"):
        path = f"{prefix}.{ext}"
        if not os.path.isfile(path):
            return f"{path} is missing"
        if os.path.getsize(path) != sidecar[f"{ext}_bytes"]:
            size = os.path.getsize(path)
            return f"{path} has {size} bytes, the manifest says {sidecar[f'{ext}_bytes']}"
    digest = mf.file_checksum([prefix + ".bin", prefix + ".idx"])
    if digest != sidecar["sha256"]:
        return f"sha256 {digest[:16]}... differs from the manifest's {sidecar['sha256'][:16]}..."
    try:
        check_index(open_index(prefix, sidecar))
    except ShardError as e:  # a shard recorded damaged: the checksum matches its damage
        return e.problem
    return None


def format_report(report: Report) -> str:
    width = max((len(name) for name, _, _ in report.rows), default=5)
    lines = [f"{status:<8} {name:<{width}}  {detail}" for name, status, detail in report.rows]
    counts = {}
    for _, status, _ in report.rows:
        counts[status] = counts.get(status, 0) + 1
    lines.append(f"{report.out_dir}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return "\n".join(lines)
