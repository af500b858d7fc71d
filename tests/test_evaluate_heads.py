"""`python -m mtp_dist.evaluate heads` on the tiny briefly-trained n=4 model of test_generate.py
and shards of its kind of data (successor sequences, as bytes through the byte tokenizer).

The teacher-forced acceptance is checked against the greedy self-speculative decoder on prompts
from the same shards. Conditioned on the model's own greedy continuation (where head 1's
teacher-forced argmax is the next token, so the rule is the decoder's): replaying the decoder's
verifying positions gives its per-head counts exactly, and the rate over every position agrees
with the decoder's measured rate within sampling noise (bound below). The command's numbers
equal the model's own validation losses, and bad input is one `error:` line, exit 2."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import pytest
import torch

from mtp_dist.evaluate.cli import main
from tests.support import ROOT

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*tp_group is None, using default tp group:DeprecationWarning"
)

PROMPT = 8  # prompt tokens
NEW = 48  # tokens the decoder generates per prompt


@pytest.fixture(scope="module")
def setup(megatron_1proc, tmp_path_factory):
    """(config, model, the export, the shard directory)."""
    from data_prep.tokenize import TokenizeConfig, run_tokenize
    from mtp_dist.checkpointing import export_consolidated
    from mtp_dist.config import Config, DataConfig
    from tests.test_generate import _train_tiny_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("heads")
    cfg, model, sample = _train_tiny_model()
    data = DataConfig(synthetic=True, tokenizer="byte")
    export = export_consolidated(model, root / "n4.pt", Config(model=cfg, data=data).to_dict(), 8)
    # The byte tokenizer's ids are the bytes: documents of the model's tokens 0..47 as text.
    docs = ["".join(map(chr, d.tolist())) for d in sample(100, 300)]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    shards = root / "shards"
    run_tokenize(
        TokenizeConfig([str(root / "docs.jsonl")], str(shards), "byte", progress=False)
    )  # fmt: skip
    # The model as the command sees it: read back from the export. An export keeps the
    # vocabulary without its padding rows, and a load fills them with zeros; the padded
    # logits then differ, and the cross-entropy over the padded vocabulary with them.
    from mtp_dist import sources
    from mtp_dist.model.model import build_model

    loaded = build_model(cfg)
    sources.open_source(export).load_into(loaded)
    yield cfg, loaded.eval(), export, shards
    torch.set_num_threads(threads)


def windows_of(cfg, shards, split="all", limit=None) -> torch.Tensor:
    from data_prep.tokenizers import ByteTokenizer
    from mtp_dist.evaluate.heads import held_out_windows

    tok = ByteTokenizer().identity_hash
    n, s = cfg.n_future_tokens, cfg.seq_length
    found = held_out_windows(shards, split, "98,1,1", cfg.vocab_size, tok, s + n)
    return torch.stack([torch.from_numpy(w) for w in itertools.islice(found, limit)])


def test_accepted_drafts_by_hand():
    """Head k's draft at t is accepted when heads 2..k all agree with head 1's chain."""
    from mtp_dist.evaluate.heads import accepted_drafts

    g = [5, 6, 7, 8, 9, 1]  # head 1's argmax at t = 0..5
    d2 = [6, 0, 8, 9, 0, 0]  # right at t = 0, 2, 3
    d3 = [7, 0, 0, 1, 0, 0]  # right at t = 0, 3 (and 1 never: d2 wrong there)
    d4 = [0, 0, 0, 1, 0, 0]  # right at 3 only if g[5] == 1: yes; at 0 wrong
    argmax = torch.tensor([g, d2, d3, d4])[:, :, None]
    got = accepted_drafts(argmax)[:, :, 0].int().tolist()  # positions 0..2
    assert got == [[1, 0, 1], [1, 0, 0], [0, 0, 0]]
    d4[2] = g[5]  # head 4 right at t=2, but head 3 was not: still rejected
    assert accepted_drafts(torch.tensor([g, d2, d3, d4])[:, :, None])[2, 2, 0].item() is False


def greedy_acceptance(cfg, model, prompts):
    """Teacher-forced accepted_drafts() over each prompt + its greedy continuation, cut to the
    positions the decoder verifies at while generating NEW tokens."""
    from mtp_dist.evaluate.heads import accepted_drafts
    from mtp_dist.inference.decode import Decoder, vocab_parallel_argmax

    n = cfg.n_future_tokens
    greedy = Decoder(model, cfg.vocab_size).generate(prompts, NEW + n, k=1)
    sequences = torch.tensor([p + g.tokens for p, g in zip(prompts, greedy, strict=True)])
    with torch.no_grad():
        logits = model.head_logits(sequences)
    argmax = torch.stack([vocab_parallel_argmax(x, cfg.vocab_size) for x in logits])
    # Teacher-forced on its own greedy text, head 1's argmax is the text's next token.
    assert torch.equal(argmax[0, PROMPT - 1 : -1].T, sequences[:, PROMPT:])
    # The last verifying forward is at most at PROMPT - 1 + NEW - 2 (NEW - 1 tokens made).
    return accepted_drafts(argmax)[:, : PROMPT + NEW - 2]


def ratio_se(pairs) -> float:
    """Standard error of sum(x) / sum(v) over independent sequences' (x, v), by the delta method
    (neighbouring forwards of one sequence are not independent; sequences are)."""
    x, v = (torch.tensor(c, dtype=torch.float64) for c in zip(*pairs, strict=True))
    r, m = x.sum() / v.sum(), len(v)
    return float(((x - r * v) ** 2).sum() * m / (m - 1)) ** 0.5 / float(v.sum())


def test_teacher_forced_acceptance_is_the_decoders(setup):
    """Prompts of PROMPT tokens from the shards; the greedy decoder generates NEW tokens with
    K=2 and K=4. Over `prompt + greedy continuation`, walking the teacher-forced events from
    the prompt's last position gives each sequence's verifications and per-head accepted
    drafts exactly as the decoder counted them. And as a prediction: the rates of 32 prompts
    (Tally, as `heads` reports them) against the decoder's measured rates on 32 other prompts
    agree within 4 standard errors of the difference (each a ratio estimate's standard error
    over its 32 independent sequences; 4 sigma: a chance failure about once in 16,000)."""
    from mtp_dist.evaluate.heads import Tally, walk
    from mtp_dist.inference.decode import Decoder

    cfg, model, _, shards = setup
    n = cfg.n_future_tokens
    windows = windows_of(cfg, shards, limit=64)
    prompts = [w[i % 40 : i % 40 + PROMPT].tolist() for i, w in enumerate(windows)]
    accepted = greedy_acceptance(cfg, model, prompts)
    decoder = Decoder(model, cfg.vocab_size)
    for K in (2, n):
        measured = decoder.generate(prompts, NEW, k=K)
        for b, m in enumerate(measured):
            got = walk(accepted[:, :, b : b + 1], K, start=PROMPT - 1)
            assert got == (m.verifications, m.drafts_accepted), (K, b)

    predicted, other = Tally(n), measured[32:]
    predicted.add_acceptance(accepted[:, :, :32], start=PROMPT - 1)
    summary = predicted.summary()
    V = sum(m.verifications for m in other)
    for k in range(2, n + 1):
        rate = sum(m.drafts_accepted[k - 2] for m in other) / V
        want = summary["heads"][k - 1]["acceptance"]
        mine = [walk(accepted[:, :, b : b + 1], n, PROMPT - 1) for b in range(32)]
        se = math.hypot(
            ratio_se([(c[k - 2], v) for v, c in mine]),
            ratio_se([(m.drafts_accepted[k - 2], m.verifications) for m in other]),
        )
        assert abs(rate - want) <= 4 * se + 1e-4, (k, rate, want, se)
    tokens = sum(len(m.tokens) - 1 for m in other)  # the prompt's forward made one each
    assert summary["tokens_per_forward"][str(n)] == pytest.approx(tokens / V, abs=0.15)
    assert 0.2 < summary["heads"][1]["acceptance"] < 0.8  # both outcomes common: it has power


def heads(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mtp_dist.evaluate", "heads", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_the_command_and_the_models_own_losses(setup):
    """--json over --max-windows windows in batches of 3 (a last short batch): its losses equal
    the model's validation forward on the same windows; accuracies, acceptance and tokens per
    forward equal tally_windows over them in one batch; with K = n tokens per forward is 1 +
    the acceptances; the table prints the same numbers."""
    from mtp_dist.evaluate.heads import Tally, tally_windows

    cfg, model, export, shards = setup
    n = cfg.n_future_tokens
    run = heads(str(export), "--data", str(shards), "--max-windows", "7", "--batch", "3", "--json")
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    windows = windows_of(cfg, shards, limit=7)
    with torch.no_grad():
        own = model(windows)
    tally = Tally(n)
    tally_windows(model, windows, cfg.vocab_size, tally)
    want = tally.summary()
    assert got["windows"] == 7 and got["positions"] == 7 * cfg.seq_length
    losses = [h["loss"] for h in got["heads"]]
    assert losses == pytest.approx(own.head_losses.tolist(), abs=2e-4)
    for key in ("accuracy", "acceptance", "acceptance_any_position"):
        assert [h.get(key) for h in got["heads"]] == pytest.approx(
            [h.get(key) for h in want["heads"]], abs=2e-4
        )
    assert got["tokens_per_forward"] == pytest.approx(want["tokens_per_forward"], abs=2e-4)
    accept = [h["acceptance"] for h in got["heads"][1:]]  # K = n: 1 + the acceptances
    assert got["tokens_per_forward"][str(n)] == pytest.approx(1 + sum(accept), abs=5e-4)
    assert got["model"]["step"] == 8 and got["data"]["split"] == "all"
    table = heads(str(export), "--data", str(shards), "--limit", "7", "--batch", "3")
    assert table.returncode == 0, table.stderr
    assert f"{got['heads'][1]['acceptance']:.4f}" in table.stdout
    assert f"K=4 {got['tokens_per_forward']['4']:.3f}" in table.stdout


def test_greedy_prompt_predicts_the_decoder_on_those_prompts(setup):
    """--greedy-prompt P: acceptance on each window's first P tokens continued greedily. The
    decoder with K=n on the same prompts, to the model's context, measures the same rates up to
    its last few forwards (whose drafts reach past the context, where the walk stops): within
    0.02 here; losses are still the data's."""
    from mtp_dist.inference.decode import Decoder

    cfg, model, export, shards = setup
    n, s = cfg.n_future_tokens, cfg.seq_length
    args = ("--data", str(shards), "--max-windows", "16", "--batch", "8", "--json")
    run = heads(str(export), *args, "--greedy-prompt", str(PROMPT))
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    on_data = json.loads(heads(str(export), *args).stdout)
    assert got["data"]["acceptance_on"] == f"greedy continuations of {PROMPT}-token prompts"
    assert [h["loss"] for h in got["heads"]] == [h["loss"] for h in on_data["heads"]]
    prompts = [w[:PROMPT].tolist() for w in windows_of(cfg, shards, limit=16)]
    measured = Decoder(model, cfg.vocab_size).generate(prompts, s - PROMPT, k=n)
    V = sum(m.verifications for m in measured)
    for k in range(2, n + 1):
        rate = sum(m.drafts_accepted[k - 2] for m in measured) / V
        assert got["heads"][k - 1]["acceptance"] == pytest.approx(rate, abs=0.02), k
    assert got["heads"][1]["acceptance"] != on_data["heads"][1]["acceptance"]


def test_sampled_prompt_predicts_speculative_sampling(setup):
    """--prompt P --temperature T: the acceptance of self-speculative sampling, predicted from
    sampled continuations of 32 prompts, agrees with the decoder's measured rate on 32 other
    prompts within 4 standard errors of the difference; and as T -> 0 it is greedy's exactly."""
    from mtp_dist.evaluate.heads import Tally, tally_greedy_acceptance, tally_sampled_acceptance
    from mtp_dist.inference.decode import Decoder
    from mtp_dist.inference.sampling import Sampling

    cfg, model, _, shards = setup
    n, s, vocab = cfg.n_future_tokens, cfg.seq_length, cfg.vocab_size
    windows = windows_of(cfg, shards, limit=64)
    decoder = Decoder(model, vocab)
    sampling = Sampling(temperature=0.8, top_k=20, seed=3)
    tally = Tally(n)
    tally_sampled_acceptance(model, decoder, windows[:32], PROMPT, vocab, tally, sampling)
    predicted = tally.summary()
    prompts = [w[:PROMPT].tolist() for w in windows[32:]]
    measured = decoder.generate(prompts, s - PROMPT, k=n, sampling=sampling)
    for k in range(2, n + 1):
        pairs = [(m.drafts_accepted[k - 2], m.verifications) for m in measured]
        rate = sum(x for x, _ in pairs) / sum(v for _, v in pairs)
        bound = 4 * 2**0.5 * ratio_se(pairs)  # two samples of about the same noise
        assert predicted["heads"][k - 1]["acceptance"] == pytest.approx(rate, abs=bound), k

    cold, greedy = Tally(n), Tally(n)
    tally_sampled_acceptance(
        model, decoder, windows[:8], PROMPT, vocab, cold, Sampling(temperature=1e-6), draws=1
    )
    tally_greedy_acceptance(model, decoder, windows[:8], PROMPT, vocab, greedy)
    assert cold.walks == greedy.walks and cold.accepted == greedy.accepted


def test_a_model_with_one_head(setup, tmp_path):
    """n=1: head 1's loss and accuracy, no acceptance, no tokens per forward."""
    from mtp_dist.checkpointing import export_consolidated
    from mtp_dist.config import Config, DataConfig
    from mtp_dist.model.model import build_model
    from mtp_dist.model.weights import init_weights
    from tests.test_generate import tiny_config

    one = build_model(tiny_config(n=1))
    init_weights(one, seed=1)
    config = Config(model=tiny_config(n=1), data=DataConfig(synthetic=True, tokenizer="byte"))
    export = export_consolidated(one, tmp_path / "n1.pt", config.to_dict(), 0)
    run = heads(str(export), "--data", str(setup[3]), "--max-windows", "2", "--json")
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    assert [sorted(h) for h in got["heads"]] == [["accuracy", "head", "loss"]]
    assert got["tokens_per_forward"] == {} and got["verifications"] == 0
    assert heads(str(export), "--data", str(setup[3]), "--max-windows", "2").returncode == 0


def test_validation_split(setup):
    """--split valid reads the documents of the model's data.split's validation part: here
    (98,1,1 of 100 documents of 301 tokens in one shard) document 98 alone."""
    cfg, _, _, shards = setup
    valid = windows_of(cfg, shards, "valid")
    everything = windows_of(cfg, shards).flatten()
    assert len(valid) == 301 // (cfg.seq_length + cfg.n_future_tokens)
    tail = everything[98 * 301 : 98 * 301 + valid.numel()]
    assert torch.equal(valid.flatten(), tail)


def test_bad_input(setup, tmp_path, capsys):
    from data_prep.tokenize import TokenizeConfig, run_tokenize
    from tests.test_data_prep_support import spm_model

    _, _, export, shards = setup
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "empty").mkdir()
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "def f():\n    return 1\n"}) + "\n")
    other = tmp_path / "spm"
    config = TokenizeConfig([str(tmp_path / "docs.jsonl")], str(other), spm_model(), progress=False)
    run_tokenize(config)
    short = tmp_path / "short"  # one document of 23 tokens: no window of 68
    run_tokenize(TokenizeConfig([str(tmp_path / "docs.jsonl")], str(short), "byte", progress=False))
    cases = [
        ([str(tmp_path / "notes.txt"), "--data", str(shards)], "cannot be read"),
        ([str(export), "--data", str(tmp_path / "empty")], "no manifest.json"),
        ([str(export), "--data", str(tmp_path / "notes.txt")], "not a directory"),
        ([str(export), "--data", str(other)], "not tokenized with the model's tokenizer"),
        ([str(export), "--data", str(shards), "--max-windows", "0"], "--max-windows 0"),
        ([str(export), "--data", str(shards), "--batch", "0"], "--batch 0"),
        ([str(export), "--data", str(shards), "--greedy-prompt", "61"], "give 1..60"),
        ([str(export), "--data", str(shards), "--temperature", "0.8"], "needs --prompt P"),
        ([str(export), "--data", str(shards), "--temperature", "-1"], "--temperature -1"),
        ([str(export), "--data", str(short), "--split", "all"], "fewer than one window"),
    ]
    for args, message in cases:
        assert main(["heads", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_cli_help():
    with pytest.raises(SystemExit) as exit_info:
        main(["heads", "--help"])
    assert exit_info.value.code == 0
