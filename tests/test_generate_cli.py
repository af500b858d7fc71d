"""`python -m mtp_dist.generate` from the user's side: its output and stats, each form of a model
(export, Hugging Face directory, checkpoint at TP2) decoding the same tokens with the tokenizer
and context the model carries, and its bad input refused with one `error:` line (another
tokenizer, a prompt past the context, invalid UTF-8, out-of-range flags). The model is
test_generate.py's tiny trained one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mtp_dist.checkpointing import export_consolidated
from mtp_dist.config import Config, DataConfig, ModelConfig
from mtp_dist.generate import main
from mtp_dist.inference.decode import Decoder
from mtp_dist.model.model import build_model
from mtp_dist.model.weights import init_weights
from tests.support import ROOT, torchrun
from tests.test_generate import tiny_config
from tests.test_generate import trained as trained  # noqa: F401 (a fixture, used by name)

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*tp_group is None, using default tp group:DeprecationWarning"
)


@pytest.fixture(scope="module")
def exports(trained, tmp_path_factory):
    """The trained model as a `python -m mtp_dist.export` file and a Hugging Face directory
    (export --format hf, byte tokenizer: no tokenizer file, its identity in mtp_dist.json),
    both recording the byte tokenizer; and an n=1 model's export."""
    from data_prep.tokenizers import ByteTokenizer
    from mtp_dist.model import hf_dir
    from mtp_dist.model.weights import full_state

    cfg, model, _ = trained
    root = tmp_path_factory.mktemp("exports")
    data = DataConfig(synthetic=True, tokenizer="byte")
    byte = ByteTokenizer().identity_hash
    config = Config(model=cfg, data=data).to_dict()
    n4 = export_consolidated(model, root / "n4.pt", config, 8, byte)
    cfg1 = tiny_config(n=1)
    one = build_model(cfg1)
    init_weights(one, seed=1)
    n1 = export_consolidated(one, root / "n1.pt", Config(model=cfg1, data=data).to_dict(), 0, byte)
    llama = hf_dir.write_dir(root / "hf", full_state(model), cfg, None, config["model"], byte, 8)
    return n4, n1, llama


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    """A sentencepiece tokenizer: not the one the exports were trained with."""
    from data_prep.tokenizers import SentencePieceOptions, train_sentencepiece

    lines = [ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.isascii()]
    out = tmp_path_factory.mktemp("tok") / "other"
    train_sentencepiece(iter(lines), str(out), SentencePieceOptions(vocab_size=500, seed=0))
    return f"{out}.model"


def run_generate(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "mtp_dist.generate", *args, "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def generate(*args: str) -> list[dict]:
    proc = run_generate(*args)
    assert "Warning" not in proc.stderr, "upstream warnings are shown only with --verbose"
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_cli_shows_upstream_warnings_only_when_asked(exports):
    """megatron-core and torch warn about their own internals (no Apex, deprecations): the
    output stays clean (generate() asserts that of every other call here), and --verbose
    shows them."""
    args = [str(exports[1]), "--prompt", "!%)-,+", "--max-new-tokens", "2", "--verbose"]
    assert "Warning: " in run_generate(*args).stderr


def test_cli_speculative_json_matches_greedy(exports):
    n4, _, _ = exports
    prompts = ["!%)-,+", "/#('&$%!,+*)"]  # bytes 33..47: the training tokens
    args = [str(n4), "--prompt", prompts[0], "--prompt", prompts[1], "--max-new-tokens", "20"]
    greedy = generate(*args)
    spec = generate(*args, "--speculative", "4", "--batch", "2")
    assert [r["prompt"] for r in spec] == prompts
    assert [r["tokens"] for r in spec] == [r["tokens"] for r in greedy]
    assert [r["completion"] for r in spec] == [r["completion"] for r in greedy]
    for g, s in zip(greedy, spec, strict=True):
        assert g["stats"]["forwards"] == g["stats"]["new_tokens"] == len(g["tokens"])
        assert g["stats"]["acceptance"] == {}
        assert set(s["stats"]["acceptance"]) == {"2", "3", "4"}
        assert s["stats"]["forwards"] <= g["stats"]["forwards"]
        assert s["stats"]["tokens_per_forward"] == pytest.approx(
            len(s["tokens"]) / s["stats"]["forwards"], abs=1e-4
        )
    assert sum(s["stats"]["forwards"] for s in spec) < sum(g["stats"]["forwards"] for g in greedy)


def test_cli_reads_a_hugging_face_export(exports):
    """A Llama directory (export --format hf, with the sidecar's heads) decodes as the export it
    came from: its tokenizer (the byte tokenizer, recorded in mtp_dist.json) and its context
    (max_position_embeddings=64) are the model's, so a prompt near the context's end stops at
    the same token; greedy and speculative over all four heads."""
    n4, _, llama = exports
    args = ["--prompt", "!%)-,+", "--prompt", "/#('&$" * 10, "--max-new-tokens", "16", "--no-eos"]
    ours = generate(str(n4), *args)
    theirs = generate(str(llama), *args, "--speculative", "4")
    assert [r["tokens"] for r in theirs] == [r["tokens"] for r in ours]
    assert len(ours[1]["tokens"]) == 64 - 61 and ours[1]["finish_reason"] == "length"
    assert all(set(r["stats"]["acceptance"]) == {"2", "3", "4"} for r in theirs)


def test_cli_help():
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0


@pytest.mark.parametrize(
    "case, args, message",
    [
        ("n1", ["--speculative", "3"], "model.n_future_tokens=1"),
        ("n4", ["--speculative", "5"], "K must be in 2..4"),
        ("n4", ["--speculative", "1"], "K must be in 2..4"),
        ("n4", ["--prompt", "x" * 70], "a context of 64 tokens"),
        ("hf", ["--prompt", "x" * 70], "a context of 64 tokens"),
        ("n4", ["--max-new-tokens", "0"], "--max-new-tokens 0"),
        ("n4", ["--tokenizer", "OTHER"], "was trained with tokenizer"),
        ("hf", ["--tokenizer", "OTHER"], "was trained with tokenizer"),
        ("n4", ["--prompt", "caf\udce9"], "--prompt 1 is not valid UTF-8"),
        ("n4", ["--prompt-file", "LATIN1"], "is not UTF-8 text (byte 3)"),
        ("n4", ["--prompt-file", "BAD.jsonl"], "BAD.jsonl:1 is not valid UTF-8"),
    ],
)
def test_cli_bad_input(exports, other_tokenizer, tmp_path, capsys, case, args, message):
    """Refused before any process group or weight: one `error:` line, exit 2. Each form of a
    model (export, Llama directory) carries its tokenizer's identity and its context."""
    (tmp_path / "LATIN1").write_bytes(b"caf\xe9")
    (tmp_path / "BAD.jsonl").write_text('"caf\\udce9"\n')
    source = {"n4": exports[0], "n1": exports[1], "hf": exports[2]}[case]
    names = {"OTHER": other_tokenizer, "LATIN1": str(tmp_path / "LATIN1")}
    names["BAD.jsonl"] = str(tmp_path / "BAD.jsonl")
    args = [names.get(a, a) for a in args]
    prompts = "--prompt" in args or "--prompt-file" in args
    argv = [str(source), *(args if prompts else ["--prompt", "ab", *args])]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_the_tokenizer_recorded_with_a_model(tmp_path):
    """generate and export --format hf read the tokenizer by one rule (sources.load_tokenizer):
    the recorded one or the given one, refused (one line naming the fix) if missing,
    unreadable, not the one training used, or of another size; export alone may go without
    (optional)."""
    from mtp_dist.sources import ModelSource, SourceError, load_tokenizer

    def source(tokenizer, tokenizer_hash=None, vocab_size=259):
        m = ModelConfig(**{**tiny_config().__dict__, "vocab_size": vocab_size})
        cfg = Config(model=m, data=DataConfig(synthetic=True, tokenizer=tokenizer))
        return ModelSource(tmp_path, "export", cfg, 0, None, tokenizer_hash)

    assert load_tokenizer(source("byte")).vocab_size == 259
    assert load_tokenizer(source(None), "byte").vocab_size == 259
    assert load_tokenizer(source(None), optional=True) is None  # synthetic data
    assert load_tokenizer(source("byte", "0" * 64), "none", optional=True) is None
    (tmp_path / "bad.model").write_bytes(b"not a model")
    refused = [
        (source(None), None, False, "records no tokenizer"),
        (source(None, "0" * 64), None, True, "records no tokenizer"),
        (source(str(tmp_path / "gone.model")), None, False, "does not exist here"),
        (source(None), str(tmp_path / "bad.model"), True, "cannot be read"),
        (source("byte", "0" * 64), None, False, "was trained with tokenizer 000000000000"),
        (source(None, vocab_size=250), "byte", False, "has 259 tokens, but export"),
    ]
    for src, given, optional, message in refused:
        with pytest.raises(SourceError, match=message) as e:
            load_tokenizer(src, given, optional=optional)
        assert "--tokenizer" in str(e.value) and "\n" not in str(e.value)


def byte_prompt(text: str) -> list[int]:
    """What the CLI decodes for a prompt with the byte tokenizer: an end-of-document token (257)
    first."""
    return [257, *text.encode()]


def torchrun_generate(*args: str) -> list[dict]:
    proc = torchrun(2, "-m", "mtp_dist.generate", *args, "--json", timeout=300)
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_tp2_speculative_gives_the_tp1_greedy_tokens(trained, exports):
    """The export's full tensors cut into TP2 shards (the padded vocabulary split over the ranks,
    the padding on rank 1): speculative decoding at TP2 gives greedy's TP1 tokens."""
    cfg, model, _ = trained
    prompts = ["!%)-,+", "/#('&$%!,+*)", "+"]
    want = Decoder(model, cfg.vocab_size).generate(
        [byte_prompt(p) for p in prompts], 30, k=1, eos_id=257
    )
    flags = [a for p in prompts for a in ("--prompt", p)]
    flags += ["--max-new-tokens", "30", "--speculative", "4", "--batch", "3"]
    out = torchrun_generate(str(exports[0]), *flags)
    assert [r["tokens"] for r in out] == [r.tokens for r in want]
    assert sum(r["stats"]["forwards"] for r in out) < sum(r.forwards for r in want)


@pytest.mark.slow
def test_generate_from_a_tp2_checkpoint(megatron_1proc, tmp_path):
    """A run trained at TP2 with the byte tokenizer: generate reads its run directory (the latest
    checkpoint, the recorded tokenizer) at TP2 under torchrun, and gives the tokens of greedy
    decoding of the same checkpoint loaded here at TP1."""
    from mtp_dist.model.model import build_model
    from mtp_dist.sources import open_source

    torchrun(2, "-m", "mtp_dist.train", "--config", "configs/tiny.yaml", f"run.dir={tmp_path}",
             "data.synthetic=true", "data.tokenizer=byte", "model.vocab_size=259",
             "parallel.tensor=2", "train.steps=2", "train.warmup_steps=1",
             "logging.wandb=false")  # fmt: skip
    source = open_source(tmp_path)
    assert source.tokenizer_name == "byte" and source.engine == "megatron"
    model = build_model(source.model)
    source.load_into(model)
    want = Decoder(model, 259).generate([byte_prompt("def f(x):")], 16, k=1, eos_id=257)
    (out,) = torchrun_generate(str(tmp_path), "--prompt", "def f(x):", "--max-new-tokens", "16",
                               "--speculative", "3")  # fmt: skip
    assert out["tokens"] == want[0].tokens


def test_prompt_files(tmp_path):
    from mtp_dist.errors import UserError
    from mtp_dist.generate import read_prompts

    (tmp_path / "one.py").write_text("def f():\n    return 1\n")
    (tmp_path / "many.jsonl").write_text('"a"\n\n{"prompt": "b"}\n{"text": "c"}\n')
    prompts = read_prompts(["x"], [tmp_path / "one.py", tmp_path / "many.jsonl"])
    assert prompts == ["x", "def f():\n    return 1\n", "a", "b", "c"]
    (tmp_path / "bad.jsonl").write_text('"a"\n{"prompt": 3}\n')
    with pytest.raises(UserError, match="bad.jsonl:2"):
        read_prompts([], [tmp_path / "bad.jsonl"])
    with pytest.raises(UserError, match="no prompt given"):
        read_prompts([], [])


def test_plain_output_has_text_and_stats(capsys):
    from data_prep.tokenizers import ByteTokenizer
    from mtp_dist.generate import _print
    from mtp_dist.inference.decode import Generation

    result = Generation(list(b" world"), "length", 3, [2, 1], 2, 0.5)
    _print(["hello"], [byte_prompt("hello")], [result], ByteTokenizer(), 3, 0.5, as_json=False)
    text, stats = capsys.readouterr().out.splitlines()
    assert text == "hello world"
    assert "6 tokens" in stats and "3 forwards" in stats and "2.00 tokens/forward" in stats
    assert "acceptance head2 1.00 head3 0.50" in stats
