"""The Hugging Face Llama format of a model: full tensors (weights.py's global names) <->
`LlamaForCausalLM` tensors, its config.json <-> ModelConfig, and the directory that holds them.

A model with n heads is a Llama of num_layers + 1 layers (the trunk, then head 1), the shared
final norm and the unembedding, with megatron's vocabulary padding removed. Heads 2..n are
layers in Llama's own names in a sidecar, `mtp_heads.safetensors`, described by
`mtp_heads.json`: head k applies its layer to the trunk's output (the input of Llama layer
num_layers), then the final norm and the unembedding, and predicts the token k ahead. n = 1
writes no sidecar: the directory is a plain Llama.

Layout facts: megatron fuses q, k, v into one weight, grouped by query group ([q of the group's
heads; k; v] per group), and SwiGLU's fc1 is [gate; up]; both are full tensors here (weights.py
undoes the tensor-parallel sharding). The layer itself (RMSNorm, SwiGLU, rotary, no biases: see
spec.py) is exactly Llama's; a Llama config outside that (biases, another activation, scaled
rotary positions) is refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mtp_dist.config import ModelConfig
from mtp_dist.errors import UserError
from mtp_dist.files import atomic_path, atomic_write_json, fsync_dir, tmp_name

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
HEADS_WEIGHTS = "mtp_heads.safetensors"
HEADS_JSON = "mtp_heads.json"
HEADS_FORMAT = "mtp-dist-heads-v1"
RECORD = "mtp_dist.json"
RECORD_FORMAT = "mtp-dist-llama-v1"
"""What the directory's model was trained with that a Llama config cannot say: the identity of
its tokenizer (also when no tokenizer file is written, e.g. the byte tokenizer) and its step."""
_POSITIVE_INTS = (
    "hidden_size",
    "num_attention_heads",
    "num_hidden_layers",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
)

_SAME = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_QKV = "self_attention.linear_qkv.weight"
_FC1 = "mlp.linear_fc1.weight"


class HFFormatError(UserError, ValueError):
    """A directory that is not a Llama this model can be, or does not match the config."""


def _attention(m: ModelConfig) -> tuple[int, int, int]:
    """(query heads, query groups, head dim)."""
    heads = m.num_attention_heads
    return heads, m.num_query_groups or heads, m.hidden_size // heads


def layer_to_llama(ours: dict[str, Tensor], m: ModelConfig) -> dict[str, Tensor]:
    """One transformer layer: megatron names (relative to the layer) -> Llama names."""
    heads, groups, dim = _attention(m)
    per_group = heads // groups
    out = {llama: ours[name] for name, llama in _SAME.items()}
    qkv = ours[_QKV].view(groups, (per_group + 2) * dim, -1)
    out["self_attn.q_proj.weight"] = qkv[:, : per_group * dim].reshape(heads * dim, -1)
    out["self_attn.k_proj.weight"] = qkv[:, per_group * dim : (per_group + 1) * dim].reshape(
        groups * dim, -1
    )
    out["self_attn.v_proj.weight"] = qkv[:, (per_group + 1) * dim :].reshape(groups * dim, -1)
    out["mlp.gate_proj.weight"], out["mlp.up_proj.weight"] = ours[_FC1].chunk(2, dim=0)
    return {k: v.contiguous() for k, v in out.items()}


def layer_from_llama(llama: dict[str, Tensor], m: ModelConfig) -> dict[str, Tensor]:
    """One transformer layer: Llama names -> megatron names (relative to the layer)."""
    heads, groups, dim = _attention(m)
    h = m.hidden_size
    out = {name: llama[hf] for name, hf in _SAME.items()}
    q = llama["self_attn.q_proj.weight"].reshape(groups, heads // groups * dim, h)
    k = llama["self_attn.k_proj.weight"].reshape(groups, dim, h)
    v = llama["self_attn.v_proj.weight"].reshape(groups, dim, h)
    out[_QKV] = torch.cat([q, k, v], dim=1).reshape(-1, h)
    out[_FC1] = torch.cat([llama["mlp.gate_proj.weight"], llama["mlp.up_proj.weight"]], dim=0)
    return out


def _layer(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _trunk_and_head1(m: ModelConfig) -> list[str]:
    """Our layer prefixes in Llama's layer order."""
    return [f"trunk.layers.{i}." for i in range(m.num_layers)] + ["heads.layers.0."]


def to_llama(state: dict[str, Tensor], m: ModelConfig) -> tuple[dict, dict]:
    """(Llama tensors, extra-head tensors keyed `heads.K.<llama layer name>` for K = 2..n) of
    a full state (global names, any vocabulary padding)."""
    llama = {}
    for j, prefix in enumerate(_trunk_and_head1(m)):
        for k, v in layer_to_llama(_layer(state, prefix), m).items():
            llama[f"model.layers.{j}.{k}"] = v
    vocab = m.vocab_size
    llama["model.embed_tokens.weight"] = state["embedding.word_embeddings.weight"][:vocab]
    llama["model.norm.weight"] = state["heads.final_norm.weight"]
    if not m.tie_embeddings:
        llama["lm_head.weight"] = state["output_layer.weight"][:vocab]
    extra = {}
    for i in range(1, m.n_future_tokens):
        for k, v in layer_to_llama(_layer(state, f"heads.layers.{i}."), m).items():
            extra[f"heads.{i + 1}.{k}"] = v
    return llama, extra


def from_llama(llama: dict[str, Tensor], extra: dict[str, Tensor], m: ModelConfig) -> dict:
    """The full state (global names; the vocabulary unpadded) of Llama tensors and extra-head
    tensors as to_llama gives them; m.n_future_tokens must be 1 + the extra heads."""
    state = {}
    for j, prefix in enumerate(_trunk_and_head1(m)):
        layer = _layer(llama, f"model.layers.{j}.")
        for k, v in layer_from_llama(layer, m).items():
            state[prefix + k] = v
    for i in range(1, m.n_future_tokens):
        for k, v in layer_from_llama(_layer(extra, f"heads.{i + 1}."), m).items():
            state[f"heads.layers.{i}.{k}"] = v
    state["embedding.word_embeddings.weight"] = llama["model.embed_tokens.weight"]
    state["heads.final_norm.weight"] = llama["model.norm.weight"]
    if not m.tie_embeddings:
        state["output_layer.weight"] = llama["lm_head.weight"]
    return state


def llama_layer_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The tensors of one Llama layer (extra heads included) and their shapes."""
    heads, groups, dim = _attention(m)
    h, f = m.hidden_size, m.ffn_size
    return {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (heads * dim, h),
        "self_attn.k_proj.weight": (groups * dim, h),
        "self_attn.v_proj.weight": (groups * dim, h),
        "self_attn.o_proj.weight": (h, heads * dim),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }


def llama_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The tensors of the Llama that holds the trunk and head 1, and their shapes."""
    layer = llama_layer_shapes(m)
    shapes = {f"model.layers.{j}.{k}": s for j in range(m.num_layers + 1) for k, s in layer.items()}
    shapes["model.embed_tokens.weight"] = (m.vocab_size, m.hidden_size)
    shapes["model.norm.weight"] = (m.hidden_size,)
    if not m.tie_embeddings:
        shapes["lm_head.weight"] = (m.vocab_size, m.hidden_size)
    return shapes


def _check_tensors(tensors: dict[str, Tensor], shapes: dict, where: Path) -> None:
    missing = sorted(set(shapes) - set(tensors))
    if missing:
        raise HFFormatError(
            f"{where} lacks {missing[0]} (and {len(missing) - 1} more): not the model its "
            f"{CONFIG} describes"
        )
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise HFFormatError(
                f"{where}: {name} has shape {tuple(tensors[name].shape)}, its {CONFIG} says "
                f"{shape}: not the model its {CONFIG} describes"
            )


def llama_config(m: ModelConfig, special_ids: dict[str, int] | None = None) -> dict:
    """config.json of the Llama that holds the trunk and head 1. special_ids: the tokenizer's
    bos/eos/pad ids (`bos_token_id` ...), if known."""
    heads, groups, dim = _attention(m)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_size,
        "num_hidden_layers": m.num_layers + 1,
        "num_attention_heads": heads,
        "num_key_value_heads": groups,
        "head_dim": dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.seq_length,
        "rms_norm_eps": m.norm_epsilon,
        "rope_theta": m.rotary_base,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": m.tie_embeddings,
        "initializer_range": m.init_std,
        "torch_dtype": "float32",
        **(special_ids or {}),
    }


def _rope_theta(cfg: dict, where: str) -> float:
    """rope_theta of a v4 (`rope_theta`, `rope_scaling`) or v5 (`rope_parameters`) config;
    scaled rotary positions are refused."""
    params = cfg.get("rope_parameters") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    scaling = cfg.get("rope_scaling")
    if kind != "default" or (
        scaling and scaling.get("rope_type", scaling.get("type")) != "default"
    ):
        raise HFFormatError(
            f"{where} uses scaled rotary positions ({params or scaling}), which this model "
            "does not have: import a Llama without rope scaling"
        )
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def model_fields(cfg: dict, where: str) -> dict:
    """The ModelConfig fields (effective values) a Llama config.json implies for a model whose
    trunk and head 1 it holds; HFFormatError if it is no Llama, or one our layer cannot be."""
    if cfg.get("model_type") != "llama":
        raise HFFormatError(
            f"{where} has model_type={cfg.get('model_type')!r}, not 'llama': model.init_from "
            "takes a Llama (LlamaForCausalLM) directory"
        )
    unsupported = [
        (key, cfg.get(key), ok)
        for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False))
        if cfg.get(key, ok) != ok
    ]
    if unsupported:
        key, value, ok = unsupported[0]
        raise HFFormatError(
            f"{where} has {key}={value!r}; this model's layers have {key}={ok!r} (SwiGLU, no "
            "biases): import a Llama with that layer"
        )
    for key in (*_POSITIVE_INTS, "num_key_value_heads"):
        value = cfg[key] if key in _POSITIVE_INTS else cfg.get(key) or 1
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise HFFormatError(f"{where} has {key}={value!r}: it must be an integer >= 1")
    for key in ("rope_theta", "rms_norm_eps"):
        value = cfg.get(key, 1.0)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise HFFormatError(f"{where} has {key}={value!r}: it must be a number > 0")
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if cfg.get("head_dim") not in (None, hidden // heads) or hidden % heads:
        raise HFFormatError(
            f"{where} has head_dim={cfg.get('head_dim')} with hidden_size={hidden} and "
            f"{heads} heads; this model needs head_dim = hidden_size / num_attention_heads"
        )
    if cfg["num_hidden_layers"] < 2:
        raise HFFormatError(
            f"{where} has {cfg['num_hidden_layers']} layer(s): the trunk gets all but the last "
            "(head 1's), so import a Llama of at least 2 layers"
        )
    return {
        "num_layers": cfg["num_hidden_layers"] - 1,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_query_groups": cfg.get("num_key_value_heads") or heads,
        "ffn_hidden_size": cfg["intermediate_size"],
        "vocab_size": cfg["vocab_size"],
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "rotary_base": _rope_theta(cfg, where),
        "norm_epsilon": float(cfg.get("rms_norm_eps", 1e-6)),
    }


def effective_fields(m: ModelConfig) -> dict:
    """The fields model_fields gives, of a ModelConfig."""
    return {
        "num_layers": m.num_layers,
        "hidden_size": m.hidden_size,
        "num_attention_heads": m.num_attention_heads,
        "num_query_groups": m.num_query_groups or m.num_attention_heads,
        "ffn_hidden_size": m.ffn_size,
        "vocab_size": m.vocab_size,
        "tie_embeddings": m.tie_embeddings,
        "rotary_base": m.rotary_base,
        "norm_epsilon": m.norm_epsilon,
    }


def check_matches(source: dict, m: ModelConfig, where: str) -> None:
    """HFFormatError naming the first field where a source's fields (effective_fields) differ
    from the model's; the number of heads may differ."""
    for key, want in effective_fields(m).items():
        have = source[key]
        if have != want:
            raise HFFormatError(
                f"{where} has model.{key}={have!r} but the config says model.{key}={want!r}: "
                f"set model.{key}={have!r} to start from it"
            )


@dataclass
class LlamaDir:
    """What a Llama directory holds, read without its tensors."""

    path: Path
    config: dict
    fields: dict
    """model_fields of its config."""
    n_future_tokens: int
    """1 + the heads in its sidecar."""
    tokenizer_hash: str | None
    """The identity hash of the tokenizer its model was trained with (data_prep's): recorded
    in mtp_dist.json, else that of its tokenizer.model, if any."""
    weight_files: list[str]
    """model.safetensors, or the shards of a sharded save."""
    context: int
    """max_position_embeddings: the longest sequence the model was trained on."""
    tokenizer: str | None
    """The tokenizer to encode with: `byte` (recorded), its tokenizer.model, or None."""
    step: int
    """The training step it was exported at (recorded; 0 if not)."""


def read_dir(path: str | os.PathLike) -> LlamaDir:
    """A Llama directory's config and sidecar description, checked."""
    import hashlib

    path = Path(path)
    where = f"Hugging Face directory {path}"
    try:
        cfg = json.loads((path / CONFIG).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFFormatError(f"{path / CONFIG} is not valid JSON ({e}): fix or re-export it") from e
    if not isinstance(cfg, dict):
        raise HFFormatError(f"{path / CONFIG} must hold a JSON object")
    try:
        fields = model_fields(cfg, where)
    except KeyError as e:
        raise HFFormatError(f"{path / CONFIG} lacks {e}: it is not a complete Llama config") from e
    weight_files = _weight_files(path, where)
    n = 1
    if (path / HEADS_WEIGHTS).is_file():
        try:
            heads = json.loads((path / HEADS_JSON).read_bytes())
            n = int(heads["n_future_tokens"]) if heads.get("format") == HEADS_FORMAT else 0
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            n = 0
        if n < 2:
            raise HFFormatError(
                f"{where} has {HEADS_WEIGHTS} but no valid {HEADS_JSON} (format {HEADS_FORMAT}, "
                f"n_future_tokens >= 2): re-export it, or remove {HEADS_WEIGHTS} to import head "
                "1 only"
            )
    record = _read_record(path)
    tok = path / "tokenizer.model"
    file_hash = hashlib.sha256(tok.read_bytes()).hexdigest() if tok.is_file() else None
    tokenizer_hash = record.get("tokenizer_hash") or file_hash
    if file_hash and tokenizer_hash != file_hash:
        raise HFFormatError(
            f"{where}: its tokenizer.model is not the tokenizer {RECORD} says the model was "
            f"trained with ({tokenizer_hash[:12]}): put the training tokenizer there"
        )
    from data_prep.tokenizers import ByteTokenizer

    tokenizer = str(tok) if file_hash else None
    if tokenizer_hash == ByteTokenizer().identity_hash:
        tokenizer = "byte"
    context = cfg["max_position_embeddings"]
    step = record.get("step", 0)
    return LlamaDir(path, cfg, fields, n, tokenizer_hash, weight_files, context, tokenizer, step)


def _read_record(path: Path) -> dict:
    """mtp_dist.json, checked ({} if there is none: a Llama from elsewhere)."""
    if not (path / RECORD).is_file():
        return {}
    try:
        record = json.loads((path / RECORD).read_bytes())
    except (ValueError, UnicodeDecodeError):
        record = None
    ok = isinstance(record, dict) and record.get("format") == RECORD_FORMAT
    if ok:
        tok, step = record.get("tokenizer_hash"), record.get("step", 0)
        ok = (tok is None or (isinstance(tok, str) and len(tok) == 64)) and (
            isinstance(step, int) and not isinstance(step, bool) and step >= 0
        )
    if not ok:
        raise HFFormatError(
            f"{path / RECORD} is damaged (format {RECORD_FORMAT}, tokenizer_hash, step): "
            "export the directory again, or remove the file to read it as a plain Llama"
        )
    return record


def _weight_files(path: Path, where: str) -> list[str]:
    """model.safetensors, or the shards its index names."""
    if (path / WEIGHTS).is_file():
        return [WEIGHTS]
    index = path / WEIGHTS_INDEX
    if not index.is_file():
        raise HFFormatError(
            f"{where} has neither {WEIGHTS} nor {WEIGHTS_INDEX}: give a directory saved with "
            "safetensors (save_pretrained's default)"
        )
    try:
        files = sorted(set(json.loads(index.read_bytes())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise HFFormatError(f"{index} is not a safetensors index ({e}): re-save the model") from e
    absent = [f for f in files if not (path / f).is_file()]
    if absent:
        raise HFFormatError(f"{where} lacks {absent[0]}, which {WEIGHTS_INDEX} names")
    return files


def load_dir(d: LlamaDir, m: ModelConfig) -> dict[str, Tensor]:
    """The full state of a Llama directory (global names, unpadded vocabulary, n from its
    sidecar) for a model config matching it (check_matches); tensors named and shaped as its
    config says, else HFFormatError."""
    import dataclasses

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    source = dataclasses.replace(m, n_future_tokens=d.n_future_tokens)
    try:
        llama = {}
        for name in d.weight_files:
            llama.update(load_file(d.path / name))
        extra = load_file(d.path / HEADS_WEIGHTS) if d.n_future_tokens > 1 else {}
    except SafetensorError as e:
        raise HFFormatError(f"{d.path}: a weights file is not safetensors ({e})") from e
    _check_tensors(llama, llama_shapes(source), d.path)
    layer = llama_layer_shapes(source)
    heads = {
        f"heads.{k}.{n}": s for k in range(2, source.n_future_tokens + 1) for n, s in layer.items()
    }
    _check_tensors(extra, heads, d.path / HEADS_WEIGHTS)
    state = from_llama(llama, extra, source)
    return {k: v.float() for k, v in state.items()}


def write_dir(
    out: str | os.PathLike,
    state: dict[str, Tensor],
    m: ModelConfig,
    tokenizer=None,
    model_config: dict | None = None,
    tokenizer_hash: str | None = None,
    step: int = 0,
) -> Path:
    """Write the directory (refused if `out` exists and is not empty), built under a temporary
    name and renamed. tokenizer: a data_prep Tokenizer to write as tokenizer files (a
    sentencepiece model: tokenizer.model, and tokenizer.json if it is BPE), or None.
    model_config: the run's model section, recorded in the sidecar's description.
    tokenizer_hash: the identity of the tokenizer training used (default: `tokenizer`'s),
    recorded with the step in mtp_dist.json."""
    from safetensors.torch import save_file

    out = Path(out)
    check_empty(out)
    llama, extra = to_llama(state, m)
    special = None
    if tokenizer is not None:
        ids = (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eod_id))
        special = {k: i for k, i in (*ids, ("pad_token_id", tokenizer.pad_id)) if i >= 0}
    tmp = tmp_name(out)
    tmp.mkdir(parents=True)
    try:
        atomic_write_json(tmp / CONFIG, llama_config(m, special))
        if tokenizer_hash is None and tokenizer is not None:
            tokenizer_hash = tokenizer.identity_hash
        record = {"format": RECORD_FORMAT, "tokenizer_hash": tokenizer_hash, "step": step}
        atomic_write_json(tmp / RECORD, record)
        if special:
            atomic_write_json(tmp / "generation_config.json", special)
        # safetensors refuses views of one storage: every tensor is its own copy.
        with atomic_path(tmp / WEIGHTS) as f:
            save_file({k: v.float().clone() for k, v in llama.items()}, f, {"format": "pt"})
        if extra:
            with atomic_path(tmp / HEADS_WEIGHTS) as f:
                save_file({k: v.float().clone() for k, v in extra.items()}, f, {"format": "pt"})
            atomic_write_json(tmp / HEADS_JSON, heads_description(m, model_config))
        if tokenizer is not None:
            write_tokenizer(tmp, tokenizer, m.seq_length)
        if out.exists():
            out.rmdir()  # empty (checked): rename replaces only a missing name portably
        os.rename(tmp, out)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out.parent)
    return out


def check_empty(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "a file" if not out.is_dir() else "a directory that is not empty"
        raise HFFormatError(f"export directory {out} is {what}: give a new or empty directory")


def heads_description(m: ModelConfig, model_config: dict | None) -> dict:
    return {
        "format": HEADS_FORMAT,
        "n_future_tokens": m.n_future_tokens,
        "trunk_layers": m.num_layers,
        "heads": {str(k): f"heads.{k}." for k in range(2, m.n_future_tokens + 1)},
        "about": (
            "Head k (k >= 2) is one Llama decoder layer, its tensors named heads.K.<name in a "
            f"Llama layer> in {HEADS_WEIGHTS}. It takes the hidden states that enter Llama "
            f"layer {m.num_layers} of {WEIGHTS} (the trunk's output; layer {m.num_layers} is "
            "head 1), and its output goes through model.norm and lm_head; at position t it "
            "predicts token t+k. Every layer uses the same rotary positions as the Llama."
        ),
        "model": model_config,
    }


def write_tokenizer(directory: Path, tokenizer, max_length: int) -> None:
    """A sentencepiece model as tokenizer.model (sentencepiece, transformers' LlamaTokenizer)
    and, for BPE, tokenizer.json + tokenizer_config.json (AutoTokenizer: encodes exactly as
    sentencepiece). Other tokenizers (bytes) have no file to write."""
    import shutil

    from data_prep.hf_tokenizer import to_hf_tokenizer, tokenizer_config

    if tokenizer.kind != "sentencepiece":
        return
    shutil.copyfile(tokenizer.model_path, directory / "tokenizer.model")
    try:
        hf = to_hf_tokenizer(tokenizer)
    except ValueError:
        return
    with atomic_path(directory / "tokenizer.json") as f:
        hf.save(str(f))
    atomic_write_json(directory / "tokenizer_config.json", tokenizer_config(tokenizer, max_length))
