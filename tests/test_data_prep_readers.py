"""The format and codec tables: detection, CLI choices and corrupt-file errors all follow them."""

from __future__ import annotations

import gzip
import io

import pyarrow.lib
import pytest
import zstandard

from data_prep.cli import build_parser
from data_prep.decompress import CODECS, codec_of, open_decompressed
from data_prep.readers import (
    FORMATS,
    INPUT_FORMATS,
    OTHER_FILES,
    BadInputFile,
    DocumentReader,
    InputShard,
    ReadOptions,
    ReadStats,
    detect_format,
    input_format,
)

ROWS = [(f.name, s) for f in INPUT_FORMATS for s in f.suffixes]
COMPRESSION = ["", *(s for c in CODECS for s in c.suffixes)]


@pytest.mark.parametrize("name,suffix", ROWS)
@pytest.mark.parametrize("compression", COMPRESSION)
def test_every_suffix_of_the_table_is_detected(name, suffix, compression):
    assert detect_format(f"data/part-0{suffix}{compression}") == name
    assert detect_format(f"data/part-0{suffix}{compression}".upper()) == name


def test_directory_and_other_files(tmp_path):
    (directory,) = [f for f in INPUT_FORMATS if f.directory]
    assert detect_format(str(tmp_path)) == directory.name
    assert detect_format("notes.md") == detect_format("README") == OTHER_FILES
    assert OTHER_FILES in FORMATS


def test_formats_and_cli_choices_come_from_the_table(capsys):
    assert FORMATS == ("auto", *(f.name for f in INPUT_FORMATS))
    args = ["tokenize", "x.jsonl", "--output-dir", "out", "--tokenizer", "byte", "--format"]
    for name in FORMATS:
        assert build_parser().parse_args([*args, name]).format == name
    with pytest.raises(SystemExit):
        build_parser().parse_args([*args, "csv"])
    assert "invalid choice: 'csv'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown input format 'csv'"):
        input_format("csv")


def _read(path, fmt=None) -> list[str]:
    shard = InputShard((str(path),), fmt or detect_format(str(path)))
    return list(DocumentReader(shard, ReadOptions(), ReadStats()))


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_every_codec_round_trips(tmp_path, codec):
    data = b'{"text": "one"}\n{"text": "two"}\n'
    compressed = {"gzip": gzip.compress, "zstd": zstandard.ZstdCompressor().compress}[codec.name]
    for suffix in codec.suffixes:
        path = tmp_path / f"a.jsonl{suffix}"
        assert codec_of(str(path)) is codec
        path.write_bytes(compressed(data) * 2)  # two members / frames, one after the other
        assert _read(path) == ["one", "two", "one", "two"]
    assert open_decompressed(io.BytesIO(data), "a.jsonl").read() == data


def _cause(path, fmt=None) -> BaseException:
    with pytest.raises(BadInputFile) as info:
        _read(path, fmt)
    assert str(path) in str(info.value) and "recreate it" in str(info.value)
    return info.value


def test_corrupt_parquet_is_a_bad_input_file(tmp_path):
    (tmp_path / "a.parquet").write_bytes(b"PAR1 not really parquet PAR1")
    err = _cause(tmp_path / "a.parquet")
    assert err.problem.startswith("corrupt file")
    assert isinstance(err.__cause__, pyarrow.lib.ArrowInvalid)


def test_corrupt_zstd_is_a_bad_input_file(tmp_path):
    (tmp_path / "a.jsonl.zst").write_bytes(b"not zstd data" * 10)
    err = _cause(tmp_path / "a.jsonl.zst")
    assert err.problem.startswith("corrupt file")
    assert isinstance(err.__cause__, zstandard.ZstdError)
    (tmp_path / "b.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(b"x" * 1000)[:-3])
    assert _cause(tmp_path / "b.txt.zst").problem.startswith("corrupt or truncated archive")


def test_corrupt_gzip_is_a_bad_input_file(tmp_path):
    (tmp_path / "a.txt.gz").write_bytes(b"plain text, not gzip")
    err = _cause(tmp_path / "a.txt.gz")
    assert err.problem.startswith("corrupt or truncated archive")
    assert isinstance(err.__cause__, gzip.BadGzipFile)


def test_only_the_listed_exception_classes_mean_corrupt():
    parquet = input_format("parquet")
    assert parquet.corrupt_problem(pyarrow.lib.ArrowInvalid("bad footer")) == "corrupt file"
    # Out of memory is an ArrowException too, but says nothing about the file.
    assert parquet.corrupt_problem(pyarrow.lib.ArrowMemoryError("oom")) is None
    assert input_format("text").corrupt_problem(pyarrow.lib.ArrowInvalid("x")) is None
