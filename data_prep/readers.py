"""Reading documents from corpora: text, JSON Lines (plain, .gz, .zst), Parquet, and Hugging Face
`datasets` datasets (saved with save_to_disk, or loadable from local files).

Bad input is counted, never silently dropped: invalid UTF-8 is replaced and counted, empty
documents and unusable records are skipped and counted by reason. A file that cannot be read at
all raises BadInputFile, whose message names the file and the fix.
"""

from __future__ import annotations

import glob
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from data_prep.decompress import corrupt_data_problem, open_decompressed, without_codec_suffixes

FORMATS = ("auto", "text", "jsonl", "parquet", "hf")
TEXT_MODES = ("file", "line", "block")
SKIP_HINT = "or pass --skip-bad-files to skip it and record it in the manifest"


class BadInputFile(Exception):
    """An input that cannot be read; str() is the one-line message for the user."""

    def __init__(self, path: str, problem: str, fix: str) -> None:
        super().__init__(f"{path}: {problem}; {fix}, {SKIP_HINT}")
        self.path, self.problem, self.fix = path, problem, fix

    def __reduce__(self):
        # Raised in pool workers: pickle with the constructor's arguments, not the message.
        return (BadInputFile, (self.path, self.problem, self.fix))


@dataclass(frozen=True)
class ReadOptions:
    text_mode: str = "file"
    text_field: str = "text"
    hf_split: str = "train"

    def as_dict(self) -> dict:
        return {
            "text_mode": self.text_mode,
            "text_field": self.text_field,
            "hf_split": self.hf_split,
        }


@dataclass(frozen=True)
class InputShard:
    """What becomes one output shard: some files of one format, or a part of a HF dataset."""

    paths: tuple[str, ...]
    fmt: str
    part: int = 0
    num_parts: int = 1

    def describe(self) -> dict:
        d = {"paths": list(self.paths), "format": self.fmt}
        if self.num_parts > 1:
            d["part"] = [self.part, self.num_parts]
        return d

    def size_bytes(self) -> int:
        total = 0
        for p in self.paths:
            if os.path.isdir(p):
                for root, _, files in os.walk(p):
                    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
            elif os.path.isfile(p):
                total += os.path.getsize(p)
        return max(1, total // self.num_parts)


@dataclass
class ReadStats:
    documents: int = 0
    invalid_utf8_documents: int = 0
    skipped: Counter = field(default_factory=Counter)


def detect_format(path: str) -> str:
    if os.path.isdir(path):
        return "hf"
    name = without_codec_suffixes(path)
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def plan_input_shards(
    patterns: list[str], fmt: str = "auto", files_per_shard: int = 1, hf_num_shards: int = 1
) -> list[InputShard]:
    """Expand paths and globs into input shards, in an order that every SLURM task agrees on.

    A pattern that matches nothing is an error (a typo would otherwise make an empty corpus);
    a plain path that does not exist is kept, so that it fails (or is skipped) when read.
    """
    files: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise BadInputFile(pattern, "no file matches this pattern", "check the path")
            files.extend(matches)
        else:
            files.append(pattern)
    seen: set[str] = set()
    files = [f for f in files if not (f in seen or seen.add(f))]
    by_format: dict[str, list[str]] = {}
    for f in files:
        by_format.setdefault(detect_format(f) if fmt == "auto" else fmt, []).append(f)
    shards: list[InputShard] = []
    for f_fmt, paths in by_format.items():
        if f_fmt == "hf":
            for p in paths:
                shards.extend(
                    InputShard((p,), "hf", k, hf_num_shards) for k in range(hf_num_shards)
                )
        else:
            for i in range(0, len(paths), files_per_shard):
                shards.append(InputShard(tuple(paths[i : i + files_per_shard]), f_fmt))
    return shards


class DocumentReader:
    """Iterates over the documents of one InputShard; `consumed_bytes` tracks progress."""

    def __init__(self, shard: InputShard, opts: ReadOptions, stats: ReadStats) -> None:
        self.shard, self.opts, self.stats = shard, opts, stats
        self.consumed_bytes = 0

    def __iter__(self) -> Iterator[str]:
        done = 0
        for path in self.shard.paths:
            size = os.path.getsize(path) if os.path.isfile(path) else 0
            try:
                yield from self._read(path, done)
            except BadInputFile:
                raise
            except FileNotFoundError as e:
                raise BadInputFile(path, "file not found", "check the path") from e
            except PermissionError as e:
                raise BadInputFile(path, "permission denied", "make it readable") from e
            except Exception as e:
                problem = corrupt_data_problem(e)
                if problem is not None:
                    raise BadInputFile(path, f"{problem} ({e})", "recreate it") from e
                if type(e).__name__ in ("ArrowInvalid", "ArrowException"):
                    raise BadInputFile(path, f"corrupt file ({e})", "recreate it") from e
                if isinstance(e, OSError):
                    raise BadInputFile(path, f"cannot read ({e})", "check the file") from e
                raise
            done += size
            self.consumed_bytes = done

    def _read(self, path: str, done: int) -> Iterator[str]:
        fmt = self.shard.fmt
        if fmt == "hf":
            yield from self._read_hf(path)
        elif fmt == "parquet":
            yield from self._read_parquet(path, done)
        else:
            with open(path, "rb") as raw:
                stream = open_decompressed(raw, path)
                if fmt == "jsonl":
                    docs = self._jsonl_docs(stream)
                elif fmt == "text":
                    docs = self._text_docs(stream)
                else:
                    raise ValueError(f"unknown input format {fmt!r}; one of {FORMATS}")
                for doc in docs:
                    self.consumed_bytes = done + raw.tell()
                    yield doc

    def _decode(self, data: bytes) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            self.stats.invalid_utf8_documents += 1
            return data.decode("utf-8", errors="replace")

    def _checked(self, text) -> str | None:
        """A document from a structured source: must be a non-empty, encodable string."""
        if text is None:
            self.stats.skipped["null_field"] += 1
            return None
        if not isinstance(text, str):
            self.stats.skipped["field_not_a_string"] += 1
            return None
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates from JSON escapes such as "\ud800"
            self.stats.invalid_utf8_documents += 1
            text = text.encode("utf-8", errors="replace").decode("utf-8")
        return self._nonempty(text)

    def _nonempty(self, text: str) -> str | None:
        if not text.strip():
            self.stats.skipped["empty"] += 1
            return None
        self.stats.documents += 1
        return text

    def _text_docs(self, stream) -> Iterator[str]:
        mode = self.opts.text_mode
        if mode == "file":
            docs = iter([stream.read()])
        elif mode == "line":
            docs = (line.rstrip(b"\r\n") for line in stream)
        elif mode == "block":
            docs = _blocks(stream)
        else:
            raise ValueError(f"unknown text mode {mode!r}; one of {TEXT_MODES}")
        for data in docs:
            text = self._nonempty(self._decode(data))
            if text is not None:
                yield text

    def _jsonl_docs(self, stream) -> Iterator[str]:
        key = self.opts.text_field
        for line in stream:
            if not line.strip():
                continue
            try:
                record = json.loads(self._decode(line))
            except json.JSONDecodeError:
                self.stats.skipped["invalid_json"] += 1
                continue
            if not isinstance(record, dict) or key not in record:
                self.stats.skipped["missing_field"] += 1
                continue
            text = self._checked(record[key])
            if text is not None:
                yield text

    def _read_parquet(self, path: str, done: int) -> Iterator[str]:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if self.opts.text_field not in pf.schema_arrow.names:
            raise BadInputFile(
                path,
                f"no column {self.opts.text_field!r} (columns: {pf.schema_arrow.names})",
                "choose the column with --text-field",
            )
        size, rows, seen = os.path.getsize(path), max(1, pf.metadata.num_rows), 0
        for batch in pf.iter_batches(batch_size=4096, columns=[self.opts.text_field]):
            column = batch.column(0).to_pylist()
            seen += len(column)
            self.consumed_bytes = done + size * seen // rows
            for value in column:
                text = self._checked(value)
                if text is not None:
                    yield text

    def _read_hf(self, path: str) -> Iterator[str]:
        ds = load_hf_dataset(path, self.opts.hf_split)
        if self.opts.text_field not in ds.column_names:
            raise BadInputFile(
                path,
                f"no column {self.opts.text_field!r} (columns: {ds.column_names})",
                "choose the column with --text-field",
            )
        if self.shard.num_parts > 1:
            ds = ds.shard(self.shard.num_parts, self.shard.part, contiguous=True)
        ds = ds.select_columns([self.opts.text_field])
        total, rows, seen = self.shard.size_bytes(), max(1, len(ds)), 0
        for batch in ds.iter(batch_size=4096):
            column = batch[self.opts.text_field]
            seen += len(column)
            self.consumed_bytes = total * seen // rows
            for value in column:
                text = self._checked(value)
                if text is not None:
                    yield text


def load_hf_dataset(path: str, split: str):
    """A dataset saved with save_to_disk, or a local directory of data files (json, parquet,
    csv, text) that `datasets.load_dataset` understands. Never touches the network."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    if not os.path.isdir(path):
        raise BadInputFile(path, "not a directory", "give a dataset directory")
    saved = any(
        os.path.exists(os.path.join(path, f))
        for f in ("dataset_info.json", "state.json", "dataset_dict.json")
    )
    if saved:
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise BadInputFile(path, f"no split {split!r} (has {list(ds)})", "use --hf-split")
            ds = ds[split]
        return ds
    try:
        return datasets.load_dataset(path, split=split)
    except (ValueError, FileNotFoundError) as e:
        raise BadInputFile(path, f"not loadable by datasets ({e})", "check the directory") from e


def _blocks(stream) -> Iterator[bytes]:
    """Documents separated by one or more blank lines."""
    lines: list[bytes] = []
    for line in stream:
        if line.strip():
            lines.append(line)
        elif lines:
            yield b"".join(lines).rstrip(b"\r\n")
            lines = []
    if lines:
        yield b"".join(lines).rstrip(b"\r\n")
