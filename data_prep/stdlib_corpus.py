"""A corpus made of the running Python's standard-library sources, so that the README demo and
the benchmark need no download. Files are taken in sorted order, so the corpus is the same on
every run with the same Python."""

from __future__ import annotations

import json
import os
import sysconfig

from mtp_dist.errors import UserError
from mtp_dist.files import atomic_path


def stdlib_files() -> list[str]:
    """Sorted *.py files under the stdlib directory, without site-packages."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        files.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: os.path.relpath(p, root))


def write_stdlib_corpus(
    out_dir: str, max_mb: float | None = None, num_shards: int = 4, fmt: str = "jsonl"
) -> list[str]:
    """Write the corpus as `num_shards` shards of about equal size; return their paths.

    jsonl (default): one record {"text", "path"} per source file, i.e. one document per file.
    text: the files joined by blank lines; read with `--text-mode block` this gives one
    document per blank-line-separated block of code, a finer split than jsonl's.
    """
    root = sysconfig.get_paths()["stdlib"]
    docs: list[tuple[str, str]] = []
    budget = None if max_mb is None else int(max_mb * 1e6)
    used = 0
    for path in stdlib_files():
        with open(path, "rb") as f:
            data = f.read()
        if budget is not None and used + len(data) > budget:
            break
        used += len(data)
        # A few test files are deliberately not UTF-8; the corpus is text, so replace.
        docs.append((os.path.relpath(path, root), data.decode("utf-8", errors="replace")))
    if not docs:
        raise UserError(
            f"--max-mb {max_mb} holds no source file of the standard library (the first alone "
            "is larger): give more, e.g. --max-mb 1"
        )
    os.makedirs(out_dir, exist_ok=True)
    target = max(1, used // max(1, num_shards))
    shards: list[list[tuple[str, str]]] = [[]]
    size = 0
    for doc in docs:
        if size >= target and len(shards) < num_shards:
            shards.append([])
            size = 0
        shards[-1].append(doc)
        size += len(doc[1])
    paths = []
    for i, shard in enumerate(shards):
        ext = "jsonl" if fmt == "jsonl" else "txt"
        path = os.path.join(out_dir, f"stdlib-{i:05d}.{ext}")
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for rel, text in shard:
                if fmt == "jsonl":
                    f.write(json.dumps({"text": text, "path": rel}) + "\n")
                else:
                    f.write(text.rstrip("\n") + "\n\n")
        paths.append(path)
    return paths
