"""The Hugging Face Llama format (model/hf.py, export --format hf) and model.init_from, in one
process: transformers' LlamaForCausalLM computes our head 1's logits and greedy continuations
from an exported directory; the tokenizer files encode as sentencepiece; the conversions
invert each other; heads are added and dropped on import; bad directories are refused. The
multi-process side (TP2 x PP2 checkpoints, both engines) is in test_hf_layouts.py.

Tiny Llama configs are built here; nothing is downloaded."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mtp_dist import checkpointing as ckpt
from mtp_dist import init_from
from mtp_dist.config import ModelConfig
from mtp_dist.model import hf, hf_dir
from mtp_dist.model.model import build_model
from mtp_dist.model.weights import VOCAB_PARAMS, full_state, init_weights, load_full
from tests.support import ROOT

GQA = dict(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=500,  # padded to 512: the export must drop the padding
    vocab_multiple=64,
    seq_length=48,
    rotary_base=5000.0,
    norm_epsilon=1e-6,
    init_std=0.1,  # well-separated logits: greedy choices are not near-ties
)
CONFIGS = {
    "n3_gqa_untied": ModelConfig(n_future_tokens=3, **GQA),
    "n1_mha_tied": ModelConfig(
        **{**GQA, "n_future_tokens": 1, "num_query_groups": None, "tie_embeddings": True}
    ),
}
LOGITS_ATOL = 1e-4  # fp32; measured differences ~2e-7


def our_model(m: ModelConfig, seed: int = 7):
    model = build_model(m)
    init_weights(model, seed)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from data_prep.tokenizers import SentencePieceOptions, train_sentencepiece

    text = "\n".join(p.read_text() for p in sorted((ROOT / "mtp_dist" / "model").glob("*.py")))
    lines = (ln for ln in text.splitlines() if ln.strip())
    out = tmp_path_factory.mktemp("tok") / "tok"
    return train_sentencepiece(lines, str(out), SentencePieceOptions(vocab_size=500, seed=0))


def export_dir(tmp_path, m, model, tokenizer=None):
    return hf_dir.write_dir(tmp_path / "hf", full_state(model), m, tokenizer, {"n": 0})


def llama(path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def head1_logits(model, tokens, vocab: int):
    """Our head 1's logits [b, s, vocab] (the padding's columns cut off)."""
    with torch.no_grad():
        return model.head_logits(tokens, [0])[0].transpose(0, 1)[..., :vocab]


@pytest.mark.parametrize("name", CONFIGS)
def test_transformers_computes_head_1s_logits(megatron_1proc, tmp_path, name):
    m = CONFIGS[name]
    model = our_model(m)
    out = export_dir(tmp_path, m, model)
    files = sorted(p.name for p in out.iterdir())
    sidecar = [hf.HEADS_JSON, hf.HEADS_WEIGHTS]
    assert set(sidecar) <= set(files) if m.n_future_tokens > 1 else not set(sidecar) & set(files)
    lm = llama(out)
    assert lm.config.num_hidden_layers == m.num_layers + 1 and lm.config.vocab_size == 500
    tokens = torch.randint(0, m.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = lm(tokens).logits
    torch.testing.assert_close(theirs, head1_logits(model, tokens, 500), rtol=0, atol=LOGITS_ATOL)


def our_greedy(model, prompt: torch.Tensor, new: int, vocab: int, eos: int) -> list[int]:
    """Greedy decoding that recomputes the whole prefix at every step."""
    tokens = prompt
    for _ in range(new):
        nxt = head1_logits(model, tokens, vocab)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
        if nxt.item() == eos:
            break
    return tokens[0, prompt.shape[1] :].tolist()


def test_transformers_generate_equals_our_greedy_decoding(megatron_1proc, tmp_path, tokenizer):
    m = CONFIGS["n3_gqa_untied"]
    model = our_model(m, seed=11)
    lm = llama(export_dir(tmp_path, m, model, tokenizer))
    assert lm.generation_config.eos_token_id == tokenizer.eod_id
    for text in ("def head_logits(self, tokens", "    return x"):
        prompt = torch.tensor([tokenizer.encode_batch([text])[0].tolist()])
        ours = our_greedy(model, prompt, 20, m.vocab_size, tokenizer.eod_id)
        with torch.no_grad():
            theirs = lm.generate(prompt, max_new_tokens=20, do_sample=False, num_beams=1)
        assert theirs[0, prompt.shape[1] :].tolist() == ours
        assert len(set(ours)) > 1  # a real continuation, not one repeated token


def test_tokenizer_files_encode_and_decode_as_sentencepiece(megatron_1proc, tmp_path, tokenizer):
    from transformers import AutoTokenizer

    m = CONFIGS["n1_mha_tied"]
    out = export_dir(tmp_path, m, our_model(m), tokenizer)
    assert (out / "tokenizer.model").read_bytes() == open(tokenizer.model_path, "rb").read()
    theirs = AutoTokenizer.from_pretrained(out)
    source = (ROOT / "README.md").read_text()
    texts = [source[i : i + 200] for i in range(0, 20000, 101)]
    texts += ["  two leading spaces", "\n\tx", "é 😀 日本", "ends  ", "", "</s> <pad> literal"]
    for text in texts:
        ids = tokenizer.encode_batch([text])[0].tolist()
        assert theirs(text)["input_ids"] == ids, text
        assert theirs.decode(ids) == tokenizer.decode(ids), text
    assert theirs.eos_token_id == tokenizer.eod_id and theirs.pad_token_id == tokenizer.pad_id


@pytest.mark.parametrize("name", CONFIGS)
def test_llama_conversion_inverts(name):
    """state -> Llama tensors -> state gives back every tensor (the vocabulary unpadded)."""
    m = CONFIGS[name]
    gen = torch.Generator().manual_seed(0)
    state = {}
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_model(m).state_dict().items() if "_extra" not in k}
    for k, shape in shapes.items():
        if m.tie_embeddings and k == "output_layer.weight":
            continue
        state[k] = torch.randn(shape, generator=gen)
    llama_tensors, extra = hf.to_llama(state, m)
    assert {k: tuple(v.shape) for k, v in llama_tensors.items()} == hf.llama_shapes(m)
    assert len(extra) == (m.n_future_tokens - 1) * 9
    back = hf.from_llama(llama_tensors, extra, m)
    assert set(back) == set(state)
    for k, v in state.items():
        assert torch.equal(back[k], v[:500] if k in VOCAB_PARAMS else v), k


def test_grouped_qkv_split_by_head(megatron_1proc):
    """Query head j of Llama uses k/v head j // (heads / groups); megatron's fused weight holds,
    per group, its query heads, then its k, then its v."""
    m = CONFIGS["n3_gqa_untied"]
    dim, per_group = 16, 2
    rows = torch.arange(128.0)[:, None].expand(128, 64)  # row r holds r
    ours = {name: torch.zeros(1) for name in hf._SAME}
    layer = hf.layer_to_llama({**ours, hf._QKV: rows, hf._FC1: torch.zeros(384, 64)}, m)
    group_rows = (per_group + 2) * dim
    q = layer["self_attn.q_proj.weight"][:, 0].view(4, dim)
    k = layer["self_attn.k_proj.weight"][:, 0].view(2, dim)
    for head in range(4):
        g = head // per_group
        assert q[head, 0] == g * group_rows + (head % per_group) * dim
        assert k[g, 0] == g * group_rows + per_group * dim


def test_heads_added_and_dropped_on_import(megatron_1proc, tmp_path):
    """An export (.pt) of n=3 as n=2 (head 3 dropped) and n=4 (head 4 a copy of head 1); an HF
    directory without a sidecar as n=2 (head 2 a copy of head 1)."""
    m = CONFIGS["n3_gqa_untied"]
    model = our_model(m)
    state = full_state(model)
    cfg = {"model": {**GQA, "n_future_tokens": 3}, "data": {"synthetic": True}}
    ckpt.export_consolidated(model, tmp_path / "m.pt", cfg, step=5)
    source = init_from.inspect(tmp_path / "m.pt")
    assert source.kind == "export" and source.model.n_future_tokens == 3

    def head(s, i):
        return {k.split(".", 3)[3]: v for k, v in s.items() if k.startswith(f"heads.layers.{i}.")}

    for n, expected in ((2, [0, 1]), (4, [0, 1, 2, 0])):
        loaded = init_from.load(source, ModelConfig(**{**GQA, "n_future_tokens": n}))
        assert sum(k.startswith("heads.layers.") for k in loaded) == 6 * n  # 6 tensors a layer
        for i, j in enumerate(expected):
            for k, v in head(loaded, i).items():
                assert torch.equal(v, head(state, j)[k])
        assert loaded["output_layer.weight"].shape[0] == 500  # padding dropped, not copied
    plain = hf_dir.write_dir(tmp_path / "hf", state, ModelConfig(**{**GQA, "n_future_tokens": 1}))
    loaded = init_from.load(init_from.inspect(plain), ModelConfig(**{**GQA, "n_future_tokens": 2}))
    for k, v in head(loaded, 1).items():
        assert torch.equal(v, head(state, 0)[k])


def test_a_llama_saved_by_transformers_imports_as_exported(megatron_1proc, tmp_path):
    """save_pretrained's own config (transformers' version of it) and sharded files."""
    m = CONFIGS["n1_mha_tied"]
    out = hf_dir.write_dir(tmp_path / "hf", full_state(our_model(m)), m)
    llama(out).save_pretrained(tmp_path / "saved", max_shard_size="100KB")
    assert (tmp_path / "saved" / hf.WEIGHTS_INDEX).is_file()
    saved = init_from.inspect(tmp_path / "saved")
    assert hf.effective_fields(saved.model) == hf.effective_fields(m)  # rope_theta 5000 etc.
    ours, theirs = (init_from.load(init_from.inspect(p), m) for p in (out, tmp_path / "saved"))
    assert set(ours) == set(theirs)
    for k, v in ours.items():
        assert torch.equal(theirs[k], v), k


def test_import_fills_any_vocabulary_padding_and_loads_exactly(megatron_1proc, tmp_path):
    """The imported tensors land in the model as they are; the rows the config's padding adds
    keep the seed's values."""
    from mtp_dist.model.weights import init_parameter

    m = CONFIGS["n3_gqa_untied"]
    state = full_state(our_model(m))
    out = hf_dir.write_dir(tmp_path / "hf", state, m)
    target = ModelConfig(**{**GQA, "n_future_tokens": 3, "vocab_multiple": 128})  # 512 again
    source = init_from.load(init_from.inspect(out), target)
    model = build_model(target)
    init_weights(model, 3, source)
    got = full_state(model)
    fresh = build_model(target)
    for name, _ in fresh.named_parameters():
        init_parameter(fresh, name, 3)
    drawn = full_state(fresh)
    for k, v in state.items():
        if k in VOCAB_PARAMS:
            assert torch.equal(got[k][:500], v[:500]) and torch.equal(got[k][500:], drawn[k][500:])
        else:
            assert torch.equal(got[k], v), k
    load_full(fresh, got)  # the shapes are the model's own


def write_llama(tmp_path, m, **config_changes):
    """An HF directory of model config m, its config.json changed as given."""
    out = hf_dir.write_dir(tmp_path / "hf", full_state(our_model(m)), m)
    cfg = json.loads((out / hf.CONFIG).read_text())
    (out / hf.CONFIG).write_text(json.dumps({**cfg, **config_changes}))
    return out


def check_run(tmp_path, capsys, source, *overrides) -> tuple[int, str]:
    """`python -m mtp_dist.train --check` in this process (preflight only)."""
    from mtp_dist.train import main

    model = [f"model.{k}={'null' if v is None else v}" for k, v in GQA.items()]
    run = [f"run.dir={tmp_path / 'run'}", f"model.init_from={source}"]
    code = main(["--check", *model, "model.n_future_tokens=2", "data.synthetic=true", *run,
                 *overrides])  # fmt: skip
    return code, capsys.readouterr()


@pytest.mark.parametrize(
    "change, words",
    [
        ({"model_type": "mistral"}, ["model_type='mistral'", "not 'llama'"]),
        ({"attention_bias": True}, ["attention_bias=True", "no biases"]),
        ({"hidden_act": "gelu"}, ["hidden_act='gelu'", "SwiGLU"]),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, ["scaled rotary"]),
        ({"intermediate_size": 256}, ["model.ffn_hidden_size=256", "config says", "192"]),
        ({"num_key_value_heads": 4}, ["model.num_query_groups=4", "set model.num_query_groups"]),
        ({"num_hidden_layers": 4}, ["model.num_layers=3"]),
        ({"max_position_embeddings": 32}, ["a context of 32 tokens", "model.seq_length <= 32"]),
        ({"num_attention_heads": 0}, ["num_attention_heads=0", "an integer >= 1"]),
        ({"hidden_size": "64"}, ["hidden_size='64'", "an integer >= 1"]),
        ({"rms_norm_eps": -1}, ["rms_norm_eps=-1", "a number > 0"]),
        ({"max_position_embeddings": None}, ["max_position_embeddings=None"]),
    ],
)
def test_a_directory_that_is_not_this_llama_is_refused(
    megatron_1proc, tmp_path, capsys, change, words
):
    out = write_llama(tmp_path, CONFIGS["n3_gqa_untied"], **change)
    code, (stdout, stderr) = check_run(tmp_path, capsys, out)
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
    assert code == 2 and len(errors) == 1, stderr
    for word in words:
        assert word in errors[0]


def test_a_matching_directory_passes_the_checks(megatron_1proc, tmp_path, capsys):
    out = write_llama(tmp_path, CONFIGS["n3_gqa_untied"])
    code, (stdout, _) = check_run(tmp_path, capsys, out)
    assert code == 0 and f"from the weights of model.init_from Hugging Face directory {out}" in (
        stdout
    )


def test_damaged_directories_are_refused(megatron_1proc, tmp_path, capsys):
    m = CONFIGS["n3_gqa_untied"]
    out = write_llama(tmp_path, m)
    (out / hf.HEADS_JSON).unlink()
    code, (_, stderr) = check_run(tmp_path, capsys, out)
    assert code == 2 and f"no valid {hf.HEADS_JSON}" in stderr
    shutil.rmtree(out)
    out = write_llama(tmp_path, m)
    tensors = load_file(out / hf.WEIGHTS)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, out / hf.WEIGHTS, {"format": "pt"})
    with pytest.raises(hf.HFFormatError, match="lacks model.layers.1.mlp.up_proj.weight"):
        hf_dir.load_dir(hf_dir.read_dir(out), m)
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(192, 63)
    save_file(tensors, out / hf.WEIGHTS, {"format": "pt"})
    with pytest.raises(hf.HFFormatError, match=r"up_proj.weight has shape \(192, 63\)"):
        hf_dir.load_dir(hf_dir.read_dir(out), m)
    for bad in (tmp_path / "nothing", tmp_path / "run"):
        bad.mkdir(exist_ok=True)
        code, (_, stderr) = check_run(tmp_path, capsys, bad)
        assert (
            code == 2 and "no Hugging Face directory" in stderr and "no such checkpoint" in stderr
        )
    code, (_, stderr) = check_run(tmp_path, capsys, out, "train.resume=elsewhere")
    assert code == 2 and "set one of them" in stderr


def test_export_into_a_directory_that_is_not_empty_is_refused(tmp_path, capsys):
    from mtp_dist.export import main

    step = tmp_path / "ckpt" / "step_00000001"
    step.mkdir(parents=True)
    meta = {"step": 1, "consumed_samples": 8, "config": {"data": {"synthetic": True}}}
    (step / ckpt.META).write_text(json.dumps(meta))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code = main([str(step), str(tmp_path / "out"), "--format", "hf"])
    stderr = capsys.readouterr().err
    assert code == 2 and stderr.startswith("error: ") and len(stderr.splitlines()) == 1, stderr
    assert "is a directory that is not empty" in stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
