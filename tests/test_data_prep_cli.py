"""Every data_prep subcommand has a working --help; the demo corpus helper works."""

from __future__ import annotations

import json

import pytest
from test_data_prep_support import run_cli

from data_prep.cli import COMMANDS, main


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"] if command else ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m data_prep")
    if command:
        assert command in out


def test_help_through_python_m():
    proc = run_cli("tokenize", "--help")
    assert proc.returncode == 0 and "--skip-bad-files" in proc.stdout


def test_stdlib_corpus_is_deterministic(tmp_path, capsys):
    assert main(["stdlib-corpus", str(tmp_path / "a"), "--max-mb", "1", "--num-shards", "3"]) == 0
    assert main(["stdlib-corpus", str(tmp_path / "b"), "--max-mb", "1", "--num-shards", "3"]) == 0
    a = sorted((tmp_path / "a").iterdir())
    assert [p.name for p in a] == [f"stdlib-{i:05d}.jsonl" for i in range(3)]
    for p in a:
        assert p.read_bytes() == (tmp_path / "b" / p.name).read_bytes()
    total = sum(p.stat().st_size for p in a)
    assert 0.5e6 < total < 1.2e6
    record = json.loads(a[0].read_text().splitlines()[0])
    assert set(record) == {"text", "path"} and record["path"].endswith(".py")


def test_train_tokenizer_and_tokenize_commands(tmp_path, capsys):
    main(["stdlib-corpus", str(tmp_path / "c"), "--max-mb", "0.5", "--num-shards", "2"])
    capsys.readouterr()
    assert (
        main(
            [
                "train-tokenizer",
                str(tmp_path / "c" / "*.jsonl"),
                "--output",
                str(tmp_path / "tok" / "tokenizer"),
                "--vocab-size",
                "400",
            ]
        )
        == 0
    )
    info = json.loads(capsys.readouterr().out)
    assert info["vocab_size"] == 400 and (tmp_path / "tok" / "tokenizer.vocab").exists()
    assert (
        main(
            [
                "tokenize",
                str(tmp_path / "c" / "*.jsonl"),
                "--output-dir",
                str(tmp_path / "out"),
                "--tokenizer",
                str(tmp_path / "tok"),
                "--workers",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    summary = capsys.readouterr().out
    assert "2 tokenized" in summary and "directory complete: True" in summary
    assert main(["manifest", str(tmp_path / "out")]) == 0
    assert json.loads(capsys.readouterr().out)["complete"] is True
