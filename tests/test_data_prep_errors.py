"""One error contract for every data_prep command, seen from the command line: a bad input, an
OS error, a sentencepiece failure or a bad environment variable is one `error:` line naming it,
exit status 2, no traceback, and no temp file left; a bug keeps its traceback."""

from __future__ import annotations

import contextlib
import subprocess

import pytest
from test_data_prep_formats import write_jsonl
from test_data_prep_support import leftovers, stdlib_docs, tokenize_args

from data_prep.cli import main


class cli:  # noqa: N801 (used like a function)
    """Run a command: its exit status and output. In this process (main() is what `python -m
    data_prep` runs) to spare the imports of a new interpreter per command; the real command
    line is tested in test_data_prep_bad_input.py."""

    def __init__(self, capsys, *args) -> None:
        try:
            self.returncode = main([str(a) for a in args])
        except SystemExit as e:  # argparse's exit on a usage error
            self.returncode = e.code
        self.stdout, self.stderr = capsys.readouterr()


def assert_one_error(proc, *needles: str) -> str:
    """Exit status 2, exactly one `error:` line (containing the needles), no traceback."""
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@contextlib.contextmanager
def tmpfs(path, options: str):
    """A small tmpfs at `path` (needs root: skipped otherwise); unmounted afterwards."""
    path.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_disk_is_one_line_and_leaves_no_partial_files(tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", stdlib_docs(40))  # ~ 2 bytes per character as uint16
    with tmpfs(tmp_path / "small", "size=256k") as small:
        proc = cli(capsys, *tokenize_args([tmp_path / "a.jsonl"], small / "out"))
        assert_one_error(proc, "No space left on device", "free disk space")
        assert leftovers(small) == []


def test_read_only_directory(tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", stdlib_docs(2))
    with tmpfs(tmp_path / "ro", "ro,size=64k") as ro:
        proc = cli(capsys, *tokenize_args([tmp_path / "a.jsonl"], ro / "out"))
        assert_one_error(proc, str(ro / "out"), "read-only")
        proc = cli(capsys, "train-tokenizer", str(tmp_path / "a.jsonl"), "--output",
                       str(ro / "tok"), "--vocab-size", "300")  # fmt: skip
        assert_one_error(proc, str(ro), "read-only")


def test_a_file_where_a_directory_is_expected_and_the_reverse(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    proc = cli(capsys, "stdlib-corpus", str(tmp_path / "file" / "corpus"), "--max-mb", "0.1")
    assert_one_error(proc, str(tmp_path / "file"), "not a directory")
    proc = cli(capsys, "manifest", str(tmp_path / "missing"))
    assert_one_error(proc, str(tmp_path / "missing"), "not a directory")
    # train-tokenizer --output tok writes tok.model: here a directory.
    write_jsonl(tmp_path / "a.jsonl", stdlib_docs(20))
    (tmp_path / "tok.model").mkdir()
    proc = cli(capsys, "train-tokenizer", str(tmp_path / "a.jsonl"), "--output",
                   str(tmp_path / "tok"), "--vocab-size", "300")  # fmt: skip
    assert_one_error(proc, str(tmp_path / "tok.model"), "directory")
    assert leftovers(tmp_path) == []


def test_sentencepiece_failures(tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", ["just a few words", "and a few more"])
    proc = cli(capsys, "train-tokenizer", str(tmp_path / "a.jsonl"), "--output",
                   str(tmp_path / "tok"), "--vocab-size", "5000")  # fmt: skip
    assert_one_error(proc, "Vocabulary size too high", "lower --vocab-size")
    assert not (tmp_path / "tok.model").exists() and leftovers(tmp_path) == []

    (tmp_path / "garbage.model").write_bytes(b"\x00\x01 not a model \xff" * 10)
    proc = cli(capsys, *tokenize_args([tmp_path / "a.jsonl"], tmp_path / "out",
                                  str(tmp_path / "garbage.model")))  # fmt: skip
    assert_one_error(proc, "garbage.model", "not a sentencepiece model")


@pytest.mark.parametrize("sample", ["0", "100"])
def test_a_bad_file_stops_train_tokenizer_with_its_own_message(tmp_path, capsys, sample):
    write_jsonl(tmp_path / "a.jsonl", stdlib_docs(5))
    (tmp_path / "b.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    proc = cli(capsys, "train-tokenizer", tmp_path / "*.jsonl*", "--output", tmp_path / "tok",
               "--vocab-size", "300", "--input-sentence-size", sample)  # fmt: skip
    error = assert_one_error(proc, "b.jsonl.gz: corrupt or truncated archive")
    assert "--skip-bad-files" not in error and not (tmp_path / "tok.model").exists()


def test_train_tokenizer_on_no_text(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    proc = cli(capsys, "train-tokenizer", str(tmp_path / "empty.jsonl"), "--output",
                   str(tmp_path / "tok"), "--vocab-size", "300")  # fmt: skip
    assert_one_error(proc, "0 sentences", "no text")


@pytest.mark.parametrize(
    "env,needle",
    [
        ({"SLURM_ARRAY_TASK_ID": "abc", "SLURM_ARRAY_TASK_COUNT": "2"}, "'abc' is not an integer"),
        ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "2"}, "--array=0-1"),
        ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "x"}, "SLURM_ARRAY_TASK_COUNT"),
    ],
)
def test_malformed_slurm_array_variables(tmp_path, monkeypatch, capsys, env, needle):
    write_jsonl(tmp_path / "a.jsonl", ["text"])
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code = main(tokenize_args([tmp_path / "a.jsonl"], tmp_path / "out"))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1
    assert needle in err
    # Explicit options win over the environment.
    code = main(tokenize_args([tmp_path / "a.jsonl"], tmp_path / "out", "byte",
                              "--task-index", "0", "--num-tasks", "1"))  # fmt: skip
    assert code == 0


def test_unparseable_dataset_directory_is_a_bad_input_file(tmp_path, capsys):
    bad = tmp_path / "hf"
    bad.mkdir()
    (bad / "a.json").write_text('{"text": "a"\n{{{garbage\n')
    write_jsonl(tmp_path / "good.jsonl", stdlib_docs(2))
    proc = cli(capsys, *tokenize_args([bad, tmp_path / "good.jsonl"], tmp_path / "out"))
    assert_one_error(proc, str(bad), "not loadable by datasets", "--skip-bad-files")
    proc = cli(capsys, *tokenize_args([bad, tmp_path / "good.jsonl"], tmp_path / "out", "byte",
                                  "--skip-bad-files"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 bad files skipped" in proc.stdout and "directory complete: True" in proc.stdout


def test_bad_option_values_are_one_line(tmp_path, capsys):
    proc = cli(capsys, *tokenize_args([tmp_path / "a.jsonl"], tmp_path / "out", "byte",
                                  "--workers", "0"))  # fmt: skip
    assert_one_error(proc, "--workers", "below 1")
    proc = cli(capsys, "tokenize", "x.jsonl")
    assert_one_error(proc, "--output-dir")
    for size in ("0", "-1", "inf"):
        proc = cli(capsys, "stdlib-corpus", tmp_path / "c", "--max-mb", size)
        assert_one_error(proc, "--max-mb", "must be a finite number > 0")
    proc = cli(capsys, "stdlib-corpus", tmp_path / "c", "--max-mb", "0.000001")
    assert_one_error(proc, "--max-mb 1e-06 holds no source file")
    assert not (tmp_path / "c").exists()
    proc = cli(capsys, "induction-copy", tmp_path / "no-corpus", tmp_path / "copy")
    assert_one_error(proc, "is not an induction corpus's names.json", "induction-corpus")
    assert not (tmp_path / "copy").exists()


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    import data_prep.stdlib_corpus

    def broken(*args):
        raise KeyError("not a user error")

    monkeypatch.setattr(data_prep.stdlib_corpus, "write_stdlib_corpus", broken)
    assert main(["stdlib-corpus", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError" in err and "this is a bug" in err


def test_tokenizer_not_found(tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", ["text"])
    proc = cli(capsys, *tokenize_args([tmp_path / "a.jsonl"], tmp_path / "out",
                                  str(tmp_path / "nope.model")))  # fmt: skip
    assert_one_error(proc, "nope.model", "train-tokenizer")


@pytest.mark.parametrize(
    "manifest, needle",
    [
        ({"format": "mtp-dist-shards-v1", "complete": True}, "it has no list of shards"),
        ([1, 2], "it has no list of shards"),
        ({"shards": [], "complete": "yes"}, "does not say whether"),
        ({"shards": [{"status": "complete"}], "complete": True}, "without a shard name"),
        (
            {"shards": [{"shard": "s", "status": "complete", "tokens": "many"}], "complete": True},
            "bin_bytes=None is not a count",
        ),
    ],
)
def test_a_damaged_manifest_is_one_line(tmp_path, capsys, manifest, needle):
    """File contents are not trusted: a manifest of the wrong shape is refused by name, by
    verify and by training's reader alike (both read it through load_manifest)."""
    import json

    from data_prep.manifest import ManifestError
    from mtp_dist.data import data_identity

    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert_one_error(cli(capsys, "verify", tmp_path), "manifest.json is damaged", needle)
    with pytest.raises(ManifestError, match="is damaged"):
        data_identity([str(tmp_path)], 259)


def test_no_output_over_an_input(tmp_path, capsys):
    """A shard, sidecar or manifest name, or a tokenizer's .model/.vocab, that is one of the
    inputs: refused before anything is written, the input as it was."""
    out = tmp_path / "out"
    out.mkdir()
    write_jsonl(out / "shard-00000.json", stdlib_docs(2))  # a JSON-lines input named as a sidecar
    before = (out / "shard-00000.json").read_bytes()
    proc = cli(capsys, *tokenize_args([out / "shard-00000.json"], out, "byte", "--format", "jsonl"))
    assert_one_error(proc, "shard-00000.json is what tokenize reads", "destroy its input")
    write_jsonl(tmp_path / "tok.vocab", stdlib_docs(20))
    proc = cli(capsys, "train-tokenizer", tmp_path / "*.vocab", "--output", tmp_path / "tok",
               "--vocab-size", "300", "--format", "jsonl")  # fmt: skip
    assert_one_error(proc, "tok.vocab is what train-tokenizer reads")
    assert (out / "shard-00000.json").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["shard-00000.json"]
    assert not (tmp_path / "tok.model").exists()
