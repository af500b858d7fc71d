"""A shard's .bin/.idx (megatron-core's IndexedDataset format): written, and read and checked
without the .bin.

Layout of NAME.idx: the magic `MMIDIDX\\0\\0`, version (u64, 1), dtype code (u8), sequence count S
(u64), document count D (u64), then S int32 sequence lengths (in tokens), S int64 sequence
pointers (byte offsets into NAME.bin) and D int64 document indices (into the sequences). NAME.bin
is the tokens, back to back. The shards written here hold one sequence per document, so D = S + 1
and the document indices are 0..S.

`ShardWriter` writes the format itself, not through megatron-core's IndexedDatasetBuilder: that
module imports torch (1-1.5 s here) and megatron-core's package (2-3 s more; its own imports need
the package: megatron.core.utils and parallel_state import each other), which every tokenize run,
such as each small task of a SLURM array, would pay before its first token.
tests/test_data_prep_shard_format.py checks that both writers give the same bytes, and that
megatron-core's reader reads every document back.

A damaged .idx makes megatron-core misbehave rather than fail: lengths of zero make GPTDataset
loop forever, pointers past the end of the .bin read garbage. `open_index` checks what can be
checked in O(1) (header, counts, file sizes, against the sidecar); `check_index` checks every
length and pointer, in O(S) over the .idx only (tens of bytes per document, never the .bin).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

from mtp_dist.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8
DTYPES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
"""megatron-core's DType codes."""
_CODES = {np.dtype(t): code for code, t in DTYPES.items()}
_CHUNK = 1 << 20  # sequences per step of check_index: bounded memory for any shard size


class ShardError(UserError, ValueError):
    """A shard whose files contradict each other or its sidecar; the message names it."""

    def __init__(self, prefix: str, problem: str) -> None:
        where = os.path.dirname(prefix) or "."
        super().__init__(
            f"shard {prefix}: {problem}: the shard is damaged; list every damaged shard with "
            f"`python -m data_prep verify {where}`, remove their .json files and rerun "
            "`python -m data_prep tokenize` to redo them"
        )
        self.prefix, self.problem = prefix, problem

    def __reduce__(self):
        return (ShardError, (self.prefix, self.problem))


def token_dtype(vocab_size: int):
    """The smallest dtype the shards of a vocabulary are written with."""
    return np.uint16 if vocab_size <= 65535 else np.int32


class ShardWriter:
    """Writes one shard: `add_documents` appends tokens to the .bin as they come, `finalize`
    writes the .idx. The lengths are kept as one int32 array per batch (4 bytes a document)."""

    def __init__(self, bin_path: str, dtype) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODES:
            raise ValueError(f"megatron-core's format has no code for {self.dtype}")
        self.data_file = open(bin_path, "wb")
        self._lengths: list[np.ndarray] = []

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Documents of `lengths` tokens each, concatenated in `tokens`."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != tokens.size:
            raise ValueError(f"the lengths add up to {int(lengths.sum())}, not {tokens.size}")
        self.data_file.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._lengths.append(lengths.astype(np.int32))

    def finalize(self, idx_path: str) -> None:
        """Close the .bin and write the .idx (native byte order for the arrays, like
        megatron-core's writer; little-endian header)."""
        self.data_file.close()
        lengths = np.concatenate([np.zeros(0, np.int32), *self._lengths])
        pointers = np.zeros(lengths.size, dtype=np.int64)
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        sequences = lengths.size
        with open(idx_path, "wb") as f:
            f.write(MAGIC + struct.pack("<QBQQ", 1, _CODES[self.dtype], sequences, sequences + 1))
            f.write(lengths.tobytes())
            f.write(pointers.tobytes())
            f.write(np.arange(sequences + 1, dtype=np.int64).tobytes())

    def close(self) -> None:
        """Close the .bin without an .idx (a failed shard)."""
        self.data_file.close()


@dataclass(frozen=True)
class ShardIndex:
    prefix: str
    dtype: np.dtype
    sequences: int
    documents: int
    bin_bytes: int

    def _array(self, dtype, count: int, offset: int) -> np.ndarray:
        if count == 0:  # numpy cannot map zero bytes
            return np.zeros(0, dtype=dtype)
        return np.memmap(self.prefix + ".idx", dtype=dtype, mode="r", offset=offset, shape=count)

    @property
    def lengths(self) -> np.ndarray:
        return self._array(np.int32, self.sequences, HEADER_BYTES)

    @property
    def pointers(self) -> np.ndarray:
        return self._array(np.int64, self.sequences, HEADER_BYTES + 4 * self.sequences)

    @property
    def document_indices(self) -> np.ndarray:
        return self._array(np.int64, self.documents, HEADER_BYTES + 12 * self.sequences)

    def tokens_between(self, first: int, end: int) -> int:
        """Tokens in sequences [first, end), from two pointers (O(1))."""
        if end <= first:
            return 0
        pointers = self.pointers
        stop = int(pointers[end]) if end < self.sequences else self.bin_bytes
        return (stop - int(pointers[first])) // self.dtype.itemsize


def open_index(prefix: str, sidecar: dict) -> ShardIndex:
    """The shard's index after the O(1) checks: header, counts and sizes against the sidecar."""
    try:
        idx_bytes = os.path.getsize(prefix + ".idx")
        bin_bytes = os.path.getsize(prefix + ".bin")
        with open(prefix + ".idx", "rb") as f:
            head = f.read(HEADER_BYTES)
    except FileNotFoundError as e:
        raise ShardError(prefix, f"{e.filename} is missing") from None
    if len(head) < HEADER_BYTES or head[: len(MAGIC)] != MAGIC:
        raise ShardError(prefix, "the .idx does not start with megatron-core's index header")
    version, code, sequences, documents = struct.unpack("<QBQQ", head[len(MAGIC) :])
    if version != 1 or code not in DTYPES:
        raise ShardError(prefix, f"the .idx has version {version} and dtype code {code}")
    dtype = np.dtype(DTYPES[code])
    want = np.dtype(token_dtype(sidecar["tokenizer"]["vocab_size"]))
    if dtype != want:
        raise ShardError(prefix, f"the .idx says {dtype} tokens, the vocabulary needs {want}")
    if sequences != sidecar["documents"] or documents != sequences + 1:
        raise ShardError(
            prefix,
            f"the .idx holds {sequences} sequences in {documents - 1} documents, the sidecar "
            f"says {sidecar['documents']} documents of one sequence each",
        )
    expected = HEADER_BYTES + 12 * sequences + 8 * documents
    if idx_bytes != expected:
        raise ShardError(prefix, f"the .idx has {idx_bytes} bytes, its header implies {expected}")
    if bin_bytes != sidecar["tokens"] * dtype.itemsize:
        raise ShardError(
            prefix,
            f"the .bin has {bin_bytes} bytes, the sidecar's {sidecar['tokens']} tokens "
            f"need {sidecar['tokens'] * dtype.itemsize}",
        )
    return ShardIndex(prefix, dtype, sequences, documents, bin_bytes)


def check_index(index: ShardIndex) -> None:
    """Every sequence has a length >= 1 and starts where the previous one ends; the lengths add
    up to the .bin; the document indices rise from 0 to the sequence count. O(S) in the .idx."""
    lengths, pointers, docs = index.lengths, index.pointers, index.document_indices
    size = index.dtype.itemsize
    offset = 0  # where the next sequence must start, in bytes
    for start in range(0, index.sequences, _CHUNK):
        n = lengths[start : start + _CHUNK].astype(np.int64)
        if n.size and int(n.min()) < 1:
            first = start + int(np.argmin(n))
            raise ShardError(index.prefix, f"sequence {first} has length {int(n[first - start])}")
        expected = offset + np.concatenate(([0], np.cumsum(n[:-1]))) * size
        bad = np.flatnonzero(pointers[start : start + _CHUNK] != expected)
        if bad.size:
            i = start + int(bad[0])
            raise ShardError(
                index.prefix,
                f"sequence {i} starts at byte {int(pointers[i])}, not {int(expected[bad[0]])}",
            )
        offset += int(n.sum()) * size
    if offset != index.bin_bytes:
        raise ShardError(
            index.prefix,
            f"the sequence lengths add up to {offset} bytes, the .bin has {index.bin_bytes}",
        )
    previous = 0
    for start in range(0, index.documents, _CHUNK):
        d = np.asarray(docs[start : start + _CHUNK])
        steps = np.diff(np.concatenate(([previous], d)))
        if (start == 0 and d[0] != 0) or (steps < 0).any() or d.max() > index.sequences:
            raise ShardError(index.prefix, "the document indices are not ordered within bounds")
        previous = int(d[-1])
    if previous != index.sequences:
        raise ShardError(
            index.prefix, f"the last document ends at {previous}, not {index.sequences}"
        )
