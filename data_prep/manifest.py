"""Per-shard sidecars and the merged manifest of an output directory.

Each finished shard gets a sidecar `<shard>.json`, written atomically after its .bin/.idx were
renamed into place. Sidecars are the source of truth: a shard is complete only if its sidecar
says so and the files on disk have the recorded sizes. A shard whose input was skipped as bad
(--skip-bad-files) is done too, with status "skipped" and no data: the directory is complete
when every shard of the run is complete or skipped, and training reads the complete ones.
Concurrent SLURM array tasks never write the same sidecar; `manifest.json` is their merge,
rewritten under an flock so that a task that finishes late can never replace a newer merge by
an older one.

Nothing here depends on time, host or process, so a killed-and-rerun output is byte-identical
to an uninterrupted one.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
from contextlib import contextmanager

from mtp_dist.errors import UserError
from mtp_dist.files import TMP_INFIX, atomic_write_json

MANIFEST = "manifest.json"
FORMAT = "mtp-dist-shards-v1"
_LOCK = ".manifest.lock"


class ManifestError(UserError, ValueError):
    """An output directory that is not a usable shard directory; the message says why."""


def shard_prefix(out_dir: str, name: str) -> str:
    return os.path.join(out_dir, name)


def sidecar_path(out_dir: str, name: str) -> str:
    return os.path.join(out_dir, f"{name}.json")


def remove_stale_tmp(path: str) -> None:
    """Remove what killed atomic writes of `path` left behind (mtp_dist.files temp names)."""
    for stale in glob.glob(glob.escape(path) + TMP_INFIX + "*"):
        os.remove(stale)


def read_sidecar(out_dir: str, name: str) -> dict | None:
    """A shard's sidecar, or None if it is missing or not a valid one (the shard is redone)."""
    try:
        with open(sidecar_path(out_dir, name)) as f:
            sidecar = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return sidecar if sidecar_problem(sidecar) is None else None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def sidecar_problem(sc) -> str | None:
    """What makes a sidecar (or a manifest's shard entry) unusable, or None: the fields every
    reader uses, with their types (file contents are not trusted)."""
    if not isinstance(sc, dict) or not isinstance(sc.get("shard"), str) or not sc["shard"]:
        return "an entry without a shard name"
    if sc.get("status") == "skipped":
        return None
    if sc.get("status") != "complete":
        return f"shard {sc['shard']}: status {sc.get('status')!r} is neither complete nor skipped"
    for key in ("bin_bytes", "idx_bytes", "tokens", "documents"):
        if not _is_int(sc.get(key)):
            return f"shard {sc['shard']}: {key}={sc.get(key)!r} is not a count"
    tok = sc.get("tokenizer")
    if not isinstance(sc.get("sha256"), str) or not (
        isinstance(tok, dict)
        and isinstance(tok.get("hash"), str)
        and _is_int(tok.get("vocab_size"))
    ):
        return f"shard {sc['shard']}: its sha256 or tokenizer (hash, vocab_size) is missing"
    return None


def is_done(out_dir: str, sidecar: dict | None) -> bool:
    """Nothing left to do for the shard: complete, or its input skipped as bad."""
    return bool(sidecar) and (sidecar.get("status") == "skipped" or is_complete(out_dir, sidecar))


def is_complete(out_dir: str, sidecar: dict | None) -> bool:
    """Complete = sidecar status complete and .bin/.idx present with the recorded sizes."""
    if not sidecar or sidecar.get("status") != "complete":
        return False
    prefix = shard_prefix(out_dir, sidecar["shard"])
    try:
        return (
            os.path.getsize(prefix + ".bin") == sidecar["bin_bytes"]
            and os.path.getsize(prefix + ".idx") == sidecar["idx_bytes"]
        )
    except OSError:
        return False


def file_checksum(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


@contextmanager
def manifest_lock(out_dir: str):
    """Held while the manifest is merged (and while a tokenize task checks the other tasks)."""
    with open(os.path.join(out_dir, _LOCK), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def merge_manifest(out_dir: str, expected_shards: list[str] | None = None) -> dict:
    """Merge all sidecars into manifest.json (atomically, under a lock) and return it.

    `expected_shards` (all shard names of the run, across SLURM tasks) lets the manifest say
    whether the directory is complete; when None, the previous manifest's list is kept.
    """
    with manifest_lock(out_dir):
        # Under the lock no other merge is writing, so any temp manifest is a killed merge's.
        remove_stale_tmp(os.path.join(out_dir, MANIFEST))
        previous = load_manifest(out_dir, required=False)
        if expected_shards is None and previous is not None:
            expected_shards = previous.get("expected_shards")
        sidecars = []
        for path in sorted(glob.glob(os.path.join(out_dir, "*.json"))):
            if os.path.basename(path) == MANIFEST:
                continue
            name = os.path.basename(path)[: -len(".json")]
            sc = read_sidecar(out_dir, name)
            if sc is not None and sc.get("format") == FORMAT:
                sidecars.append(sc)
        tokenizers = {json.dumps(s["tokenizer"], sort_keys=True) for s in sidecars}
        if len(tokenizers) > 1:
            raise ManifestError(
                f"{out_dir}: shards were made with different tokenizers; use one per dir"
            )
        complete = [s for s in sidecars if is_complete(out_dir, s)]
        done = {s["shard"] for s in sidecars if is_done(out_dir, s)}
        manifest = {
            "format": FORMAT,
            "tokenizer": sidecars[0]["tokenizer"] if sidecars else None,
            "expected_shards": expected_shards,
            "complete": expected_shards is not None and done >= set(expected_shards),
            "totals": {
                "shards": len(complete),
                "documents": sum(s["documents"] for s in complete),
                "tokens": sum(s["tokens"] for s in complete),
                "skipped_shards": sum(s["status"] == "skipped" for s in sidecars),
            },
            "shards": sidecars,
        }
        atomic_write_json(os.path.join(out_dir, MANIFEST), manifest)
    return manifest


def load_manifest(out_dir: str, required: bool = True) -> dict | None:
    path = os.path.join(out_dir, MANIFEST)
    try:
        with open(path, "rb") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        if required:
            raise ManifestError(
                f"{out_dir}: no {MANIFEST}; make the shards with `python -m data_prep tokenize`"
            ) from None
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(
            f"{path} is not valid JSON ({e}): rebuild it with `python -m data_prep manifest "
            f"{out_dir}`"
        ) from None
    problem = None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        problem = "it has no list of shards"
    elif not isinstance(manifest.get("complete"), bool):
        problem = "it does not say whether the directory is complete"
    else:
        problem = next(filter(None, map(sidecar_problem, manifest["shards"])), None)
    if problem:
        raise ManifestError(
            f"{path} is damaged ({problem}): rebuild it with `python -m data_prep manifest "
            f"{out_dir}`"
        )
    return manifest
