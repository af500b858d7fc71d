"""The one reader of model sources (mtp_dist/sources.py), from the user's side: every form of a
model (a Llama directory, an export, a directory exported again) says the same weights, context,
step and tokenizer identity, and `export` writes no output over or into its input, nowhere a
directory is missing, and nothing of a file that holds no export (the command line: exit status,
message, files before and after). The generate side is in test_generate.py, the damaged
checkpoints in test_run_safety.py."""

from __future__ import annotations

import pytest
import torch

from mtp_dist import checkpointing as ckpt
from mtp_dist import init_from
from mtp_dist.model import hf, hf_dir
from mtp_dist.model.weights import full_state
from tests.test_hf import CONFIGS, GQA, our_model
from tests.test_hf import tokenizer as tokenizer  # noqa: F401 (a fixture, used by name)


def test_every_form_of_a_model_says_the_same(megatron_1proc, tmp_path, tokenizer, capsys):
    """A Llama directory with its tokenizer, `export`ed to a .pt and back to a directory: each
    form gives the same weights, context, step and tokenizer identity, and model.init_from
    refuses each the same way when the run's data has another tokenizer. Every exported file
    has the mode the umask gives."""
    import os
    import stat

    from mtp_dist.config import Config, DataConfig
    from mtp_dist.export import main as export
    from mtp_dist.sources import SourceError, open_source

    m = CONFIGS["n3_gqa_untied"]
    out = hf_dir.write_dir(tmp_path / "hf", full_state(our_model(m)), m, tokenizer, step=7)
    mask = os.umask(0o002)  # a shared cluster's group-writable umask
    try:
        assert export([str(out), str(tmp_path / "m.pt")]) == 0
        assert export([str(tmp_path / "m.pt"), str(tmp_path / "again"), "--format", "hf"]) == 0
    finally:
        os.umask(mask)
    capsys.readouterr()
    exported = [tmp_path / "m.pt", *(tmp_path / "again").iterdir()]
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in exported} == {
        p.name: 0o664 for p in exported
    }  # safetensors alone would write its files 0600
    forms = [
        open_source(p, "model.init_from") for p in (out, tmp_path / "m.pt", tmp_path / "again")
    ]
    assert [s.kind for s in forms] == ["hf", "export", "hf"]
    want = forms[0].full_state()
    for source in forms:
        assert (source.context, source.step) == (48, 7)
        assert source.tokenizer_hash == tokenizer.identity_hash
        assert hf.effective_fields(source.model) == hf.effective_fields(m)
        state = source.full_state()
        assert set(state) == set(want) and all(torch.equal(state[k], v) for k, v in want.items())
        cfg = Config(model=m, data=DataConfig(synthetic=True))
        init_from.check(source, cfg, tokenizer.identity_hash)
        init_from.check(source, cfg, None)  # synthetic data: no tokenizer to compare
        with pytest.raises(SourceError, match=f"tokenizer {tokenizer.identity_hash[:12]}, but the"):
            init_from.check(source, cfg, "0" * 64)
    assert (tmp_path / "again" / "tokenizer.model").read_bytes() == open(
        tokenizer.model_path, "rb"
    ).read()


def test_export_refuses_to_destroy_its_input_or_write_nowhere(megatron_1proc, tmp_path, capsys):
    """export onto its own source, into a missing directory, or of a file that holds no export
    (a bare tensor, a pickle that would run code): one error line, the files as they were."""
    import pickle

    from mtp_dist.export import main as export

    cfg = {"model": {**GQA, "n_future_tokens": 3}, "data": {"synthetic": True}}
    ckpt.export_consolidated(our_model(CONFIGS["n3_gqa_untied"]), tmp_path / "m.pt", cfg, 1)
    before = (tmp_path / "m.pt").read_bytes()
    m = CONFIGS["n3_gqa_untied"]
    llama_config = hf_dir.write_dir(tmp_path / "hf", full_state(our_model(m)), m) / hf.CONFIG
    config_before = llama_config.read_bytes()
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Evil()))
    cases = [
        ([tmp_path / "m.pt", tmp_path / "m.pt"], "would destroy its input"),
        ([tmp_path / "hf", tmp_path / "hf" / "config.json"], "would destroy its input"),
        ([tmp_path / "m.pt", tmp_path / "no" / "x.pt"], "No such file or directory"),
        ([tmp_path / "m.pt", tmp_path / "no" / "x", "--format", "hf"], "No such file or"),
        ([tmp_path / "tensor.pt", tmp_path / "x.pt"], "is not an mtp-dist export"),
        ([tmp_path / "evil.pt", tmp_path / "x.pt"], "cannot be read as an mtp-dist export"),
    ]
    for args, message in cases:
        assert export([str(a) for a in args]) == 2, args
        out, err = capsys.readouterr()
        errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
        assert "pwned" not in out
    assert (tmp_path / "m.pt").read_bytes() == before
    assert llama_config.read_bytes() == config_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt", "hf", "m.pt", "tensor.pt"]
