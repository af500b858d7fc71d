"""A Hugging Face Llama directory (model/hf.py's format on disk): config.json, the weights
(model.safetensors, or the shards of a sharded save), the extra heads' sidecar
(mtp_heads.safetensors + mtp_heads.json), the tokenizer files, and mtp_dist.json (what a
Llama config cannot say: the tokenizer's identity, the step). Read without its tensors
(read_dir), its tensors on demand (load_dir), written atomically (write_dir)."""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from mtp_dist.config import ModelConfig
from mtp_dist.files import atomic_path, atomic_write_json, fsync_dir, tmp_name
from mtp_dist.model.hf import (
    CONFIG,
    HEADS_FORMAT,
    HEADS_JSON,
    HEADS_WEIGHTS,
    RECORD,
    RECORD_FORMAT,
    WEIGHTS,
    WEIGHTS_INDEX,
    HFFormatError,
    from_llama,
    llama_config,
    llama_layer_shapes,
    llama_shapes,
    model_fields,
    to_llama,
)


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
    if not out.parent.is_dir():  # as every other output: a missing parent is a mistyped path
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(out.parent))
    tmp = tmp_name(out)
    tmp.mkdir()
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
