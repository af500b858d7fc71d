"""The induction task (Gloeckle et al. 2024, Section 4.1 and Appendix J), built from the running
Python's standard library: `python -m data_prep induction-corpus OUT --seed S`.

The paper replaced the characters' names in children's stories with random two-token names and
scored, at every later occurrence of a name, whether the model predicts the name's second token
from its first. No stories are on these machines; code is, and its local variables play the
characters: each function (module-level, or a method of a module-level class) becomes one
document, and every local name it binds (parameters, assigned names, loop and comprehension
variables) is renamed consistently, across the whole function, to a random name FIRST + SECOND
from two fixed pools of pieces. Within a function the first halves are distinct, and the second
halves are drawn uniformly and independently, so at a later occurrence the second token follows
from the first only through the earlier occurrence (and is a 1 / |SECOND| guess without it).

The pieces are three-letter syllables that occur nowhere in the standard library's text (in any
letter case), so a piece in the tokenized data is always half of a renamed name; the tokenizer
is trained with the pieces as sentencepiece user-defined symbols (`train-tokenizer
--user-symbols OUT/name_pieces.txt`), which makes each half exactly one token whatever precedes
it. mtp_dist/evaluate/induction.py checks over the tokenized data that every name is those two
tokens, and `check_two_tokens` here checks it against the corpus's own count of occurrences.

Renaming uses `ast`: the positions of the Name and arg nodes of the local names, each checked
to hold that name in the source (a function where one does not, e.g. an f-string whose node
positions are off in Python 3.11, is left out). Attributes (`obj.x`), keywords of calls
(`f(x=1)`), globals, builtins, names bound by `except ... as`, imports and `match` patterns,
and `_` keep their names; `self` and `cls` are parameters like any other and are renamed (the
most frequent names of a method, as a story's main characters are of a story). Functions with
a nested class are left out (its body's names are attributes, not locals), as are functions
without a renamed name that occurs twice.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import sys
import sysconfig
import textwrap

import numpy as np

from data_prep.stdlib_corpus import stdlib_files
from mtp_dist.errors import UserError
from mtp_dist.files import atomic_path, atomic_write, atomic_write_json

CONSONANTS, VOWELS = "bdfgjklmnprstvwxz", "aeiou"
KEEP = {"_"}  # by convention a name for what is not used again
NAMES_FILE, PIECES_FILE = "names.json", "name_pieces.txt"


def syllables() -> list[str]:
    """Every consonant-vowel-consonant syllable of the pools' letters, sorted."""
    return [a + v + b for a in CONSONANTS for v in VOWELS for b in CONSONANTS]


def absent_pieces(texts: list[bytes]) -> list[str]:
    """The syllables that occur in none of `texts`, in any letter case (a table of every
    3-byte sequence: one pass over the bytes instead of one search per syllable)."""
    seen = np.zeros(1 << 24, dtype=bool)
    for text in texts:
        a = np.frombuffer(text.lower(), dtype=np.uint8).astype(np.int64)
        if len(a) >= 3:
            seen[(a[:-2] << 16) | (a[1:-1] << 8) | a[2:]] = True
    return [s for s in syllables() if not seen[(ord(s[0]) << 16) | (ord(s[1]) << 8) | ord(s[2])]]


def name_pools(texts: list[bytes], seed: int, first: int, second: int) -> tuple[list, list]:
    """Two disjoint pools of pieces absent from `texts`, drawn with `seed`."""
    pieces = absent_pieces(texts)
    if len(pieces) < first + second:
        raise UserError(
            f"only {len(pieces)} syllables are absent from the corpus, fewer than --first-names "
            f"{first} + --second-names {second}: give smaller pools"
        )
    random.Random(f"pools:{seed}").shuffle(pieces)
    return sorted(pieces[:first]), sorted(pieces[first : first + second])


def local_names(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str] | None:
    """The names to rename in `fn`, in order of first appearance; None if it has a nested
    class (whose body binds attributes, not locals)."""
    bound, excluded = {}, set(KEEP)
    for node in ast.walk(fn):  # nested functions, lambdas and comprehensions included
        if isinstance(node, ast.ClassDef):
            return None
        if isinstance(node, ast.arg):
            bound.setdefault(node.arg, (node.lineno, node.col_offset))
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store | ast.Del):
            bound.setdefault(node.id, (node.lineno, node.col_offset))
        elif isinstance(node, ast.Global | ast.Nonlocal):
            excluded.update(node.names)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            excluded.add(node.name)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            excluded.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.MatchAs | ast.MatchStar) and node.name:
            excluded.add(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            excluded.add(node.rest)
    names = [n for n in bound if n not in excluded and not n.startswith("__")]
    return sorted(names, key=lambda n: bound[n])


def occurrences(fn: ast.AST, names: set[str]) -> list[tuple[int, int, str]]:
    """(line, byte column, name) of every Name and arg node of `names` in `fn`."""
    found = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Name) and node.id in names:
            found.add((node.lineno, node.col_offset, node.id))
        elif isinstance(node, ast.arg) and node.arg in names:
            found.add((node.lineno, node.col_offset, node.arg))
    return sorted(found)


def _is_ident_byte(b: int) -> bool:
    return chr(b).isalnum() or b == ord("_") or b >= 0x80


def rename_function(lines: list[bytes], fn, rng: random.Random, first: list, second: list):
    """The function's source with its local names renamed, and {new name: old name, ...} and
    the number of renamed occurrences; None if it has no name to rename or a node's position
    does not hold its name."""
    names = local_names(fn)
    if not names:
        return None
    names = names[: len(first)]  # distinct first halves: beyond the pool, names stay
    firsts = rng.sample(first, len(names))
    new = {old: f + rng.choice(second) for old, f in zip(names, firsts, strict=True)}
    start = (fn.decorator_list[0].lineno if fn.decorator_list else fn.lineno) - 1
    out = [bytearray(line) for line in lines[start : fn.end_lineno]]
    found = occurrences(fn, set(new))
    for lineno, col, old in reversed(found):  # right to left: earlier columns stay valid
        line, end = out[lineno - 1 - start], col + len(old.encode())
        if bytes(line[col:end]) != old.encode():
            return None
        if (col > 0 and _is_ident_byte(line[col - 1])) or (
            end < len(line) and _is_ident_byte(line[end])
        ):
            return None
        line[col:end] = new[old].encode()
    counts = {}
    for _, _, old in found:
        counts[old] = counts.get(old, 0) + 1
    if max(counts.values()) < 2:
        return None
    text = textwrap.dedent(b"".join(out).decode("utf-8"))
    return text, {new[o]: o for o in names}, len(found)


def functions(tree: ast.Module):
    """Module-level functions and the methods of module-level classes, with qualified names."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    yield f"{node.name}.{item.name}", item


def file_documents(rel: str, source: bytes, seed: int, first: list, second: list) -> list[dict]:
    """One record per renamed function of a file; [] for a file that does not parse."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # a few test files are deliberately broken
        return []
    lines = source.splitlines(keepends=True)
    docs = []
    for qualname, fn in functions(tree):
        rng = random.Random(f"names:{seed}:{rel}:{qualname}:{fn.lineno}")
        done = rename_function(lines, fn, rng, first, second)
        if done is not None:
            text, names, count = done
            docs.append(
                {"text": text, "path": rel, "function": qualname, "names": names,
                 "occurrences": count}
            )  # fmt: skip
    return docs


def _utf8_sources(seed: int) -> list[tuple[str, bytes]]:
    """The standard library's UTF-8 sources in an order shuffled by `seed`."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for path in stdlib_files():
        with open(path, "rb") as f:
            data = f.read()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        files.append((os.path.relpath(path, root), data))
    random.Random(f"files:{seed}").shuffle(files)
    return files


def write_induction_corpus(
    out_dir: str,
    seed: int = 0,
    max_mb: float = 8.0,
    heldout_mb: float = 0.5,
    num_shards: int = 4,
    first_names: int = 64,
    second_names: int = 32,
    progress: bool = False,
) -> dict:
    """Write OUT/train/*.jsonl (num_shards shards), OUT/heldout/induction-00000.jsonl,
    OUT/names.json (the pools, seed and counts) and OUT/name_pieces.txt (the pieces, for
    train-tokenizer --user-symbols). Held-out files: the first `heldout_mb` MB of source files
    in the seeded order; training files: the next `max_mb` MB. Returns names.json's content."""
    if first_names < 1 or second_names < 2:
        raise UserError("--first-names must be >= 1 and --second-names >= 2")
    files = _utf8_sources(seed)
    first, second = name_pools([data for _, data in files], seed, first_names, second_names)
    splits = {"heldout": [], "train": []}
    budgets = {"heldout": heldout_mb * 1e6, "train": max_mb * 1e6}
    used = dict.fromkeys(splits, 0)
    bar = None
    if progress:  # tens of seconds for the whole library: parsing and renaming every file
        from tqdm import tqdm

        total = min(sum(budgets.values()), sum(len(d) for _, d in files))
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="induction-corpus", file=sys.stderr)
    for rel, data in files:
        split = "heldout" if used["heldout"] < budgets["heldout"] else "train"
        if used[split] >= budgets[split]:
            break
        used[split] += len(data)
        splits[split].extend(file_documents(rel, data, seed, first, second))
        if bar is not None:
            bar.update(len(data))
    if bar is not None:
        bar.close()
    for split, docs in splits.items():
        if not docs:
            raise UserError(
                f"the {split} split has no renamed function: raise --max-mb and --heldout-mb"
            )
    os.makedirs(out_dir, exist_ok=True)
    _write_shards(os.path.join(out_dir, "heldout"), splits["heldout"], 1)
    _write_shards(os.path.join(out_dir, "train"), splits["train"], num_shards)
    info = {
        "seed": seed,
        "first": first,
        "second": second,
        "chance": 1 / len(second),
        "source_mb": {k: round(v / 1e6, 3) for k, v in used.items()},
        "documents": {k: len(v) for k, v in splits.items()},
        "name_occurrences": {k: sum(d["occurrences"] for d in v) for k, v in splits.items()},
        "characters": {k: sum(len(d["text"]) for d in v) for k, v in splits.items()},
        "corpus_sha256": _digest(splits),
    }
    atomic_write(os.path.join(out_dir, PIECES_FILE), "".join(p + "\n" for p in first + second))
    atomic_write_json(os.path.join(out_dir, NAMES_FILE), info)
    return info


def _digest(splits: dict) -> str:
    h = hashlib.sha256()
    for split in sorted(splits):
        for d in splits[split]:
            h.update(json.dumps(d, sort_keys=True).encode())
    return h.hexdigest()


def _write_shards(directory: str, docs: list[dict], num_shards: int) -> None:
    os.makedirs(directory, exist_ok=True)
    num_shards = min(num_shards, len(docs))
    for i in range(num_shards):
        path = os.path.join(directory, f"induction-{i:05d}.jsonl")
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for d in docs[i::num_shards]:
                f.write(json.dumps(d) + "\n")


def read_names(path: str) -> dict:
    """names.json of an induction corpus (a directory or the file), checked."""
    if os.path.isdir(path):
        path = os.path.join(path, NAMES_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        first, second = info["first"], info["second"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"{path} is not an induction corpus's {NAMES_FILE} ({e}): give the output of "
            "`python -m data_prep induction-corpus`"
        ) from e
    if not first or not second or set(first) & set(second):
        raise UserError(f"{path}: the pools must be non-empty and disjoint; write it again")
    return info


def piece_ids(tokenizer, info: dict) -> tuple[list[int], list[int]]:
    """The token ids of the first and second pieces; an error if a piece is not one token."""
    ids = []
    for pool in (info["first"], info["second"]):
        pool_ids = []
        for piece in pool:
            encoded = [int(i) for i in tokenizer.encode_batch(["(" + piece])[0]]
            if len(encoded) < 2 or tokenizer.decode(encoded[-1:]) != piece:
                raise UserError(
                    f"name piece {piece!r} is not one token under the tokenizer: train it with "
                    f"`train-tokenizer --user-symbols` on the corpus's {PIECES_FILE}"
                )
            pool_ids.append(encoded[-1])
        ids.append(pool_ids)
    return ids[0], ids[1]


def check_two_tokens(tokenizer, info: dict, corpus_files: list[str]) -> int:
    """Every renamed occurrence in the corpus files is exactly two tokens, first piece then
    second, under `tokenizer` (the corpus's count of occurrences equals the count of first-piece
    tokens, each followed by a second-piece token, and no piece token is anywhere else).
    Returns the number of occurrences."""
    first, second = (set(p) for p in piece_ids(tokenizer, info))
    total = 0
    for path in corpus_files:
        with open(path, encoding="utf-8") as f:
            docs = [json.loads(line) for line in f]
        for doc, ids in zip(docs, tokenizer.encode_batch([d["text"] for d in docs]), strict=True):
            ids = ids.tolist()
            starts = [i for i, t in enumerate(ids) if t in first]
            seconds = [i for i, t in enumerate(ids) if t in second]
            if len(starts) != doc["occurrences"] or [i + 1 for i in starts] != seconds:
                raise UserError(
                    f"{path}: {doc['path']} {doc['function']} has {doc['occurrences']} renamed "
                    f"occurrences but {len(starts)} first-piece tokens under the tokenizer: the "
                    "names are not two tokens; train the tokenizer with --user-symbols"
                )
            total += len(starts)
    return total


def copy_document(rng: random.Random, first: list, second: list, names: int) -> str:
    """One document of the copy control: `names` random names (distinct first halves, second
    halves uniform) written without separators, a newline, and the same names again."""
    line = "".join(f + rng.choice(second) for f in rng.sample(first, names))
    return f"{line}\n{line}"


def write_copy_corpus(
    corpus_dir: str,
    out_dir: str,
    seed: int = 0,
    docs: int = 40_000,
    heldout_docs: int = 600,
    pool: int = 16,
    names: int = 15,
) -> dict:
    """The copy control (`python -m data_prep induction-copy CORPUS OUT`): documents that are
    nothing but a line of random names and that line again, so half of every document is
    predictable by induction alone (Olsson et al. 2022's repeated random tokens, written as
    the task's names). `pool` first and `pool` second halves are drawn from CORPUS's pools, so
    CORPUS's tokenizer (trained with --user-symbols) makes each name two tokens and `evaluate
    induction` scores it as it scores the code, with OUT/names.json (chance 1 / pool). Writes
    OUT/train/, OUT/heldout/ and OUT/names.json; returns names.json's content."""
    info = read_names(corpus_dir)
    if not 2 <= pool <= min(len(info["first"]), len(info["second"])):
        raise UserError(
            f"--pool {pool}: the corpus has {len(info['first'])} first and "
            f"{len(info['second'])} second halves; give 2 to the smaller of them"
        )
    if not 1 <= names <= pool or docs < 1 or heldout_docs < 1:
        raise UserError(f"--names must be 1 to --pool ({pool}); --docs, --heldout-docs >= 1")
    rng = random.Random(f"copy:{seed}")
    first = sorted(rng.sample(info["first"], pool))
    second = sorted(rng.sample(info["second"], pool))
    os.makedirs(out_dir, exist_ok=True)
    for split, count in (("train", docs), ("heldout", heldout_docs)):
        split_rng = random.Random(f"copy:{seed}:{split}")
        split_docs = [
            {"text": copy_document(split_rng, first, second, names), "path": f"copy {split}",
             "function": f"document {i}", "occurrences": 2 * names}
            for i in range(count)
        ]  # fmt: skip
        _write_shards(os.path.join(out_dir, split), split_docs, 1)
    copy_info = {
        "seed": seed, "task": "copy", "corpus": os.path.abspath(corpus_dir),
        "first": first, "second": second, "chance": 1 / pool,
        "names_per_document": names, "documents": {"train": docs, "heldout": heldout_docs},
    }  # fmt: skip
    atomic_write_json(os.path.join(out_dir, NAMES_FILE), copy_info)
    return copy_info
