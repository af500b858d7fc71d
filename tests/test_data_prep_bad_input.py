"""Bad input never stops a run silently nor corrupts it."""

from __future__ import annotations

import gzip
import json
import os

from test_data_prep_formats import decoded, tokenize, write_jsonl
from test_data_prep_support import run_cli, spm_model, stdlib_docs

from data_prep.cli import main
from data_prep.manifest import load_manifest


def test_invalid_utf8_replaced_and_counted(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"good line\nbad \xff\xfe bytes\n")
    summary = tokenize([tmp_path / "a.txt"], tmp_path / "out", read_opts=_lines())
    assert summary["invalid_utf8_documents"] == 1
    assert decoded(tmp_path / "out") == ["good line", "bad \ufffd\ufffd bytes"]
    shard = load_manifest(str(tmp_path / "out"))["shards"][0]
    assert shard["invalid_utf8_documents"] == 1


def test_lone_surrogate_in_json_is_replaced(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x \\ud800 y"}\n')
    summary = tokenize([tmp_path / "a.jsonl"], tmp_path / "out")
    assert summary["invalid_utf8_documents"] == 1
    assert decoded(tmp_path / "out") == ["x ? y"]


def test_empty_and_unusable_records_skipped_and_counted(tmp_path):
    lines = [
        json.dumps({"text": "kept"}),
        json.dumps({"text": "   \n"}),
        json.dumps({"text": ""}),
        json.dumps({"other": "no text field"}),
        json.dumps({"text": 5}),
        json.dumps({"text": None}),
        "{not json",
        "",
    ]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    summary = tokenize([tmp_path / "a.jsonl"], tmp_path / "out")
    skipped = {
        "empty": 2,
        "missing_field": 1,
        "field_not_a_string": 1,
        "null_field": 1,
        "invalid_json": 1,
    }
    assert summary["documents"] == 1 and summary["skipped_documents"] == skipped
    assert load_manifest(str(tmp_path / "out"))["shards"][0]["skipped_documents"] == skipped
    assert decoded(tmp_path / "out") == ["kept"]


def test_missing_file_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    code = main(
        [
            "tokenize",
            str(missing),
            "--output-dir",
            str(tmp_path / "out"),
            "--tokenizer",
            spm_model(),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert str(missing) in err and "file not found" in err and "--skip-bad-files" in err


def test_glob_matching_nothing_is_an_error(tmp_path, capsys):
    code = main(
        [
            "tokenize",
            str(tmp_path / "*.jsonl"),
            "--output-dir",
            str(tmp_path / "o"),
            "--tokenizer",
            "byte",
            "--no-progress",
        ]
    )
    assert code == 2 and "no file matches" in capsys.readouterr().err


def test_corrupt_gzip_exits_nonzero_naming_the_file(tmp_path):
    """Through the real command line: non-zero exit status, one-line message."""
    write_jsonl(tmp_path / "good.jsonl", stdlib_docs(3))
    data = gzip.compress(
        b"".join(json.dumps({"text": d}).encode() + b"\n" for d in stdlib_docs(20))
    )
    (tmp_path / "bad.jsonl.gz").write_bytes(data[: len(data) // 2])
    proc = run_cli(
        "tokenize",
        str(tmp_path / "bad.jsonl.gz"),
        str(tmp_path / "good.jsonl"),
        "--output-dir",
        str(tmp_path / "out"),
        "--tokenizer",
        spm_model(),
        "--no-progress",
    )
    assert proc.returncode == 2
    err_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(err_lines) == 1, proc.stderr
    assert "bad.jsonl.gz" in err_lines[0] and "corrupt or truncated" in err_lines[0]
    assert not os.path.exists(tmp_path / "out" / "shard-00000.bin")


def test_skip_bad_files_records_them(tmp_path):
    docs = stdlib_docs(4)
    write_jsonl(tmp_path / "good.jsonl", docs)
    (tmp_path / "bad.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    (tmp_path / "unreadable.jsonl").write_text("{}\n")
    os.chmod(tmp_path / "unreadable.jsonl", 0)
    inputs = [tmp_path / "bad.jsonl.gz", tmp_path / "good.jsonl", tmp_path / "missing.jsonl"]
    if not os.access(tmp_path / "unreadable.jsonl", os.R_OK):  # root can read anything
        inputs.append(tmp_path / "unreadable.jsonl")
    summary = tokenize(inputs, tmp_path / "out", skip_bad_files=True)
    assert len(summary["skipped_files"]) == len(inputs) - 1
    m = load_manifest(str(tmp_path / "out"))
    by_status = {s["input"]["paths"][0]: s for s in m["shards"]}
    assert by_status[str(tmp_path / "good.jsonl")]["status"] == "complete"
    for path in inputs:
        if path.name != "good.jsonl":
            assert by_status[str(path)]["status"] == "skipped"
            assert str(path) in by_status[str(path)]["error"]
    # Skipped inputs are done: the directory is complete, and training reads the good shard.
    assert m["totals"]["skipped_shards"] == len(inputs) - 1 and m["complete"]
    assert decoded(tmp_path / "out") == docs


def _lines():
    from data_prep.readers import ReadOptions

    return ReadOptions(text_mode="line")


def test_truncated_zstd_is_an_error_not_silent_data_loss(tmp_path):
    import zstandard

    from data_prep.readers import BadInputFile

    rows = b"".join(json.dumps({"text": d}).encode() + b"\n" for d in stdlib_docs(20))
    data = zstandard.ZstdCompressor().compress(rows)
    (tmp_path / "t.jsonl.zst").write_bytes(data[: len(data) // 2])
    try:
        tokenize([tmp_path / "t.jsonl.zst"], tmp_path / "out")
        raise AssertionError("no error")
    except BadInputFile as err:
        assert "t.jsonl.zst" in str(err) and "truncated" in str(err)
