"""Reading documents from corpora: text, JSON Lines (plain, .gz, .zst), Parquet, and Hugging Face
`datasets` datasets (saved with save_to_disk, or loadable from local files).

Each input format is one reader function and one row of INPUT_FORMATS (name, file suffixes,
reader, the exceptions that mean a corrupt file); the CLI's choices and `auto` detection come
from that table. Compressed files are opened by data_prep.decompress.

Bad input is counted, never silently dropped: invalid UTF-8 is replaced and counted, empty
documents and unusable records are skipped and counted by reason. A file that cannot be read at
all raises BadInputFile, whose message names the file and the fix.

The text field: a Parquet file or dataset without the --text-field column, and a JSON Lines file
in which no record has the field, are bad files (most likely the wrong --text-field). In a JSON
Lines file where some records have it, the records without it are skipped and counted as
`missing_field` (heterogeneous dumps, metadata lines). An empty file is not bad: it has no
documents, and a run whose inputs have no documents at all is an error of the run.
"""

from __future__ import annotations

import glob
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import BinaryIO

from data_prep.decompress import corrupt_data_problem, open_decompressed, without_codec_suffixes
from mtp_dist.errors import UserError

SKIP_HINT = "or pass --skip-bad-files to skip it and record it in the manifest"


class BadInputFile(UserError):
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
        # Every field: shards' fingerprints must change when any read option does.
        return asdict(self)


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
    """Counts of what reading kept, repaired and skipped; readers pass every document through
    `decode`, `document` or `field_value` so that nothing is dropped uncounted."""

    documents: int = 0
    invalid_utf8_documents: int = 0
    skipped: Counter = field(default_factory=Counter)

    def decode(self, data: bytes) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            self.invalid_utf8_documents += 1
            return data.decode("utf-8", errors="replace")

    def document(self, text: str) -> str | None:
        """`text` if it is a document (not only whitespace); counts it either way."""
        if not text.strip():
            self.skipped["empty"] += 1
            return None
        self.documents += 1
        return text

    def field_value(self, value) -> str | None:
        """A document from a structured source: must be a non-empty, encodable string."""
        if value is None:
            self.skipped["null_field"] += 1
            return None
        if not isinstance(value, str):
            self.skipped["field_not_a_string"] += 1
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates from JSON escapes such as "\ud800"
            self.invalid_utf8_documents += 1
            value = value.encode("utf-8", errors="replace").decode("utf-8")
        return self.document(value)


class DocumentReader:
    """Iterates over the documents of one InputShard; `consumed_bytes` tracks progress."""

    def __init__(self, shard: InputShard, opts: ReadOptions, stats: ReadStats) -> None:
        self.shard, self.opts, self.stats = shard, opts, stats
        self.consumed_bytes = 0
        self._file_start = 0

    def progress(self, nbytes: int) -> None:
        """Called by the format's reader: `nbytes` of the current input are read."""
        self.consumed_bytes = self._file_start + nbytes

    def __iter__(self) -> Iterator[str]:
        fmt = input_format(self.shard.fmt)
        for path in self.shard.paths:
            size = os.path.getsize(path) if os.path.isfile(path) else 0
            try:
                yield from fmt.read(self, path)
            except BadInputFile:
                raise
            except FileNotFoundError as e:
                raise BadInputFile(path, "file not found", "check the path") from e
            except PermissionError as e:
                raise BadInputFile(path, "permission denied", "make it readable") from e
            except Exception as e:
                problem = corrupt_data_problem(e) or fmt.corrupt_problem(e)
                if problem is not None:
                    raise BadInputFile(path, f"{problem} ({e})", "recreate it") from e
                if isinstance(e, OSError):
                    raise BadInputFile(path, f"cannot read ({e})", "check the file") from e
                raise
            self._file_start += size
            self.consumed_bytes = self._file_start


def _decompressed_items(
    reader: DocumentReader, path: str, split: Callable[[BinaryIO], Iterator[bytes]]
) -> Iterator[bytes]:
    """The items `split` cuts the decompressed file into; progress counts bytes on disk."""
    with open(path, "rb") as raw:
        for item in split(open_decompressed(raw, path)):
            reader.progress(raw.tell())
            yield item


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


_TEXT_SPLITS: dict[str, Callable[[BinaryIO], Iterator[bytes]]] = {
    "file": lambda stream: iter([stream.read()]),
    "line": lambda stream: (line.rstrip(b"\r\n") for line in stream),
    "block": _blocks,
}
TEXT_MODES = tuple(_TEXT_SPLITS)


def read_text(reader: DocumentReader, path: str) -> Iterator[str]:
    """One document per file, per line or per blank-line-separated block (--text-mode)."""
    mode = reader.opts.text_mode
    if mode not in _TEXT_SPLITS:
        raise ValueError(f"unknown text mode {mode!r}; one of {TEXT_MODES}")
    for data in _decompressed_items(reader, path, _TEXT_SPLITS[mode]):
        text = reader.stats.document(reader.stats.decode(data))
        if text is not None:
            yield text


def read_jsonl(reader: DocumentReader, path: str) -> Iterator[str]:
    """One document per line: the --text-field of a JSON object."""
    key, stats = reader.opts.text_field, reader.stats
    records, with_field, fields = 0, 0, None
    for line in _decompressed_items(reader, path, iter):  # iter(stream): its lines
        if not line.strip():
            continue
        records += 1
        try:
            record = json.loads(stats.decode(line))
        except json.JSONDecodeError:
            stats.skipped["invalid_json"] += 1
            continue
        if not isinstance(record, dict) or key not in record:
            stats.skipped["missing_field"] += 1
            fields = sorted(record) if fields is None and isinstance(record, dict) else fields
            continue
        with_field += 1
        text = stats.field_value(record[key])
        if text is not None:
            yield text
    if records and not with_field:  # nothing yielded: unusable, like Parquet without the column
        found = f"fields of the first record: {fields}" if fields else "no line is a JSON object"
        fix = "choose the field with --text-field"
        raise BadInputFile(path, f"no record has the field {key!r} ({found})", fix)


def read_parquet(reader: DocumentReader, path: str) -> Iterator[str]:
    """One document per row: the --text-field column."""
    import pyarrow.parquet as pq

    column_name = reader.opts.text_field
    pf = pq.ParquetFile(path)
    _require_column(path, column_name, pf.schema_arrow.names)
    size, rows, seen = os.path.getsize(path), max(1, pf.metadata.num_rows), 0
    for batch in pf.iter_batches(batch_size=4096, columns=[column_name]):
        column = batch.column(0).to_pylist()
        seen += len(column)
        reader.progress(size * seen // rows)
        yield from _field_documents(reader.stats, column)


def read_hf(reader: DocumentReader, path: str) -> Iterator[str]:
    """One document per row of the --hf-split: the --text-field column; a shard with
    num_parts > 1 reads its contiguous part of the rows."""
    column_name, shard = reader.opts.text_field, reader.shard
    ds = load_hf_dataset(path, reader.opts.hf_split)
    _require_column(path, column_name, ds.column_names)
    if shard.num_parts > 1:
        ds = ds.shard(shard.num_parts, shard.part, contiguous=True)
    ds = ds.select_columns([column_name])
    total, rows, seen = shard.size_bytes(), max(1, len(ds)), 0
    for batch in ds.iter(batch_size=4096):
        column = batch[column_name]
        seen += len(column)
        reader.progress(total * seen // rows)
        yield from _field_documents(reader.stats, column)


def _require_column(path: str, name: str, columns: list[str]) -> None:
    if name not in columns:
        raise BadInputFile(
            path, f"no column {name!r} (columns: {columns})", "choose the column with --text-field"
        )


def _field_documents(stats: ReadStats, values: list) -> Iterator[str]:
    for value in values:
        text = stats.field_value(value)
        if text is not None:
            yield text


def _arrow_errors() -> tuple[type[BaseException], ...]:
    import pyarrow.lib

    return (pyarrow.lib.ArrowInvalid, pyarrow.lib.ArrowException)


def _no_errors() -> tuple[type[BaseException], ...]:
    return ()


@dataclass(frozen=True)
class InputFormat:
    """One row of INPUT_FORMATS."""

    name: str
    """The --format choice."""
    title: str
    """What --help calls it."""
    suffixes: tuple[str, ...]
    """What `auto` recognises, after compression suffixes are removed."""
    read: Callable[[DocumentReader, str], Iterator[str]]
    corrupt_errors: Callable[[], tuple[type[BaseException], ...]] = _no_errors
    """Exceptions of the format's library that mean a corrupt file; called only when an
    exception is being classified, so the library loads lazily."""
    directory: bool = False
    """Read from a directory (what `auto` gives a directory), split into --hf-num-shards."""

    def corrupt_problem(self, err: BaseException) -> str | None:
        # The exact class, not its subclasses: pyarrow's ArrowMemoryError and
        # ArrowNotImplementedError are ArrowExceptions too, and do not mean a corrupt file.
        return "corrupt file" if type(err) in self.corrupt_errors() else None


INPUT_FORMATS = (
    InputFormat("text", "text", (), read_text),
    InputFormat("jsonl", "JSON Lines", (".jsonl", ".json", ".ndjson"), read_jsonl),
    InputFormat("parquet", "Parquet", (".parquet",), read_parquet, _arrow_errors),
    InputFormat("hf", "Hugging Face dataset", (), read_hf, _arrow_errors, directory=True),
)
OTHER_FILES = "text"
"""The format of a file that no row's suffixes claim."""
FORMATS = ("auto", *(f.name for f in INPUT_FORMATS))


def input_format(name: str) -> InputFormat:
    for fmt in INPUT_FORMATS:
        if fmt.name == name:
            return fmt
    raise ValueError(f"unknown input format {name!r}; one of {FORMATS}")


def detect_format(path: str) -> str:
    if os.path.isdir(path):
        return next(f.name for f in INPUT_FORMATS if f.directory)
    name = without_codec_suffixes(path)
    return next((f.name for f in INPUT_FORMATS if name.endswith(f.suffixes)), OTHER_FILES)


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
    directory_formats = {f.name for f in INPUT_FORMATS if f.directory}
    shards: list[InputShard] = []
    for f_fmt, paths in by_format.items():
        if f_fmt in directory_formats:
            for p in paths:
                shards.extend(
                    InputShard((p,), f_fmt, k, hf_num_shards) for k in range(hf_num_shards)
                )
        else:
            for i in range(0, len(paths), files_per_shard):
                shards.append(InputShard(tuple(paths[i : i + files_per_shard]), f_fmt))
    return shards


def load_hf_dataset(path: str, split: str):
    """A dataset saved with save_to_disk, or a local directory of data files (json, parquet,
    csv, text) that `datasets.load_dataset` understands. Never touches the network."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    # Our progress bar and BadInputFile (quoting the cause) say it all: no bars and logs of its own.
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)

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
    except (ValueError, FileNotFoundError, datasets.exceptions.DatasetGenerationError) as e:
        # DatasetGenerationError says only "An error occurred"; its cause names the bad file.
        why = f"{e}: {e.__cause__}" if e.__cause__ is not None else str(e)
        raise BadInputFile(
            path, f"not loadable by datasets ({' '.join(why.split())})", "check the directory"
        ) from e
