"""Compressed input files, recognised by suffix: one row of CODECS per compression.

A row gives the suffixes, an opener that wraps the raw binary file in a decompressing reader,
and the exceptions that mean the compressed data is corrupt (with how to name that problem).
Every opener raises EOFError when the data ends inside a compressed frame, so a truncated file
is an error rather than silently fewer documents.
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

TRUNCATED = "corrupt or truncated archive"


@dataclass(frozen=True)
class Codec:
    name: str
    suffixes: tuple[str, ...]
    open: Callable[[BinaryIO], BinaryIO]
    corrupt_errors: Callable[[], tuple[type[BaseException], ...]]
    """Called only when an exception is being classified, so the library loads lazily."""
    problem: str = "corrupt file"
    """What BadInputFile calls the corrupt_errors."""


def _open_gzip(raw: BinaryIO) -> BinaryIO:
    return gzip.GzipFile(fileobj=raw, mode="rb")


def _open_zstd(raw: BinaryIO) -> BinaryIO:
    return io.BufferedReader(_ZstdStream(raw), buffer_size=1 << 20)


def _zstd_errors() -> tuple[type[BaseException], ...]:
    try:
        import zstandard
    except ImportError:  # then no zstd data was read either
        return ()

    return (zstandard.ZstdError,)


CODECS = (
    Codec("gzip", (".gz",), _open_gzip, lambda: (zlib.error, gzip.BadGzipFile), TRUNCATED),
    Codec("zstd", (".zst", ".zstd"), _open_zstd, _zstd_errors),
)


def codec_of(path: str) -> Codec | None:
    name = path.lower()
    return next((c for c in CODECS if name.endswith(c.suffixes)), None)


def without_codec_suffixes(path: str) -> str:
    """The lowercased name without compression suffixes, e.g. `a.JSONL.zst` -> `a.jsonl`."""
    name = path.lower()
    for codec in CODECS:
        for suffix in codec.suffixes:
            name = name.removesuffix(suffix)
    return name


def open_decompressed(raw: BinaryIO, path: str) -> BinaryIO:
    """`raw` itself when `path` has no compression suffix."""
    codec = codec_of(path)
    return raw if codec is None else codec.open(raw)


def corrupt_data_problem(err: BaseException) -> str | None:
    """How to name `err` if it means corrupt or truncated compressed data, else None."""
    if isinstance(err, EOFError):
        return TRUNCATED
    for codec in CODECS:
        if type(err) in codec.corrupt_errors():  # exact classes, as for input formats
            return codec.problem
    return None


class _ZstdStream(io.RawIOBase):
    """Decompresses zstd frames one after another, and raises EOFError on a truncated frame
    (zstandard's stream_reader silently ends there, which would lose documents unnoticed)."""

    def __init__(self, raw) -> None:
        import zstandard

        self.raw, self.new = raw, zstandard.ZstdDecompressor().decompressobj
        self.dobj, self.pending, self.in_frame = self.new(), b"", False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.pending:
            chunk = self.raw.read(1 << 20)
            if not chunk:
                if self.in_frame:
                    raise EOFError("zstd data ended before the end of its frame")
                return 0
            while chunk:
                self.in_frame = True
                self.pending += self.dobj.decompress(chunk)
                chunk = b""
                if self.dobj.eof:  # a frame ended; what follows starts a new one
                    chunk, self.dobj, self.in_frame = self.dobj.unused_data, self.new(), False
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n
