"""model.init_from: another model's weights as the start of a new run (weights only: the
optimizer is fresh and the run starts at step 0).

A source is a Hugging Face Llama directory (model/hf.py: ours, or any Llama whose shapes match
the config), an mtp-dist consolidated export (.pt), or an mtp-dist checkpoint (either engine,
any layout). `inspect` reads what it is without its tensors and `check` compares it with the
config, so preflight refuses a mismatch before any compute; `load` gives its full tensors by
global name for the configured model, which the engine writes into the run's layout
(weights.init_parameter):

- the trunk, the final norm, the embedding and unembedding as they are (the vocabulary without
  padding: the rows the config's padding adds keep their random values, no token reaches them);
- heads 1..min(n, n_source) as they are; further heads are copies of head 1, whose layer
  predicts the next token (the paper's Section 3.6 adds or drops heads this way).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mtp_dist import checkpointing as ckpt
from mtp_dist.config import Config, ConfigError, ModelConfig
from mtp_dist.model import hf
from mtp_dist.model.weights import VOCAB_PARAMS


@dataclass
class Source:
    path: Path
    kind: str
    """hf, export or checkpoint."""
    model: ModelConfig
    """The source's own model config (for a Llama directory: implied by its config.json)."""
    tokenizer_hash: str | None
    """The identity of the tokenizer it was trained with, where it records one."""
    meta: dict | None = None
    """A checkpoint's meta.json."""
    llama: hf.LlamaDir | None = None

    def describe(self) -> str:
        names = {"hf": "Hugging Face directory", "export": "export", "checkpoint": "checkpoint"}
        return f"model.init_from {names[self.kind]} {self.path}"


def inspect(path: str | Path) -> Source:
    """What `path` holds, checked, without its tensors."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(
            f"model.init_from={path} does not exist: give a Hugging Face Llama directory, an "
            "mtp-dist export (.pt) or checkpoint"
        )
    if path.is_file():
        payload = _load_export(path)
        model = _model_config(payload.get("config", {}), path)
        return Source(path, "export", model, None)
    if (path / hf.CONFIG).is_file():
        d = hf.read_dir(path)
        model = ModelConfig(
            **{**d.fields, "n_future_tokens": d.n_future_tokens, "vocab_multiple": 1}
        )
        return Source(path, "hf", model, d.tokenizer_hash, llama=d)
    try:
        checkpoint = ckpt.find_checkpoint(path)
    except ckpt.CheckpointError as e:
        raise ConfigError(
            f"model.init_from={path} is no Hugging Face directory (it has no {hf.CONFIG}), and {e}"
        ) from e
    meta = ckpt.read_meta(checkpoint)
    model = _model_config(meta["config"], checkpoint)
    return Source(checkpoint, "checkpoint", model, meta.get("tokenizer_hash"), meta=meta)


def _load_export(path: Path) -> dict:
    try:
        payload = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # torch.load of a foreign file raises anything pickle can
        raise ConfigError(
            f"model.init_from={path} is a file but not an mtp-dist export ({type(e).__name__}): "
            "give an export of `python -m mtp_dist.export`, a Hugging Face directory or a "
            "checkpoint"
        ) from e
    if not isinstance(payload, dict) or payload.get("format") != ckpt.CONSOLIDATED_FORMAT:
        raise ConfigError(
            f"model.init_from={path} is not an mtp-dist export ({ckpt.CONSOLIDATED_FORMAT})"
        )
    return payload


def _model_config(config: dict, where: Path) -> ModelConfig:
    from mtp_dist import config as config_mod

    data = dict(config, parallel={"tensor": 1, "pipeline": 1})
    try:
        return config_mod.from_dict(data).model
    except ConfigError as e:
        raise ConfigError(f"{where} records a config that no longer loads: {e}") from e


def check(source: Source, cfg: Config, tokenizer_hash: str | None) -> None:
    """The source fits the configured model (all but the number of heads) and was trained with
    the run's tokenizer, where both are known."""
    hf.check_matches(hf.effective_fields(source.model), cfg.model, source.describe())
    if source.tokenizer_hash and tokenizer_hash and source.tokenizer_hash != tokenizer_hash:
        raise ConfigError(
            f"{source.describe()} was trained with tokenizer {source.tokenizer_hash[:12]} but "
            f"the data uses {tokenizer_hash[:12]}: use data made with its tokenizer"
        )


def load(source: Source, m: ModelConfig, seed: int = 0) -> dict[str, Tensor]:
    """The source's full tensors for model config m (see the module's docstring). A checkpoint
    is read in a process group of this process alone: call it before the run's own exists."""
    if source.kind == "hf":
        state = hf.load_dir(source.llama, m)
    elif source.kind == "export":
        state = _load_export(source.path)["state"]
    else:
        from mtp_dist import distributed
        from mtp_dist.model.weights import full_state

        with distributed.single_process(seed):
            state = full_state(checkpoint_model(source.path, source.meta))
    state = unpadded(state, source.model.vocab_size)
    return with_heads(state, source.model.n_future_tokens, m.n_future_tokens)


def checkpoint_model(checkpoint: Path, meta: dict):
    """A single-process (TP1 x PP1) model holding a checkpoint's weights, whichever engine and
    layout saved it (inside distributed.single_process or another TP1 x PP1 world)."""
    from mtp_dist.engines import engine_class
    from mtp_dist.model.model import build_model

    model = build_model(_model_config(meta["config"], checkpoint))
    engine = engine_class(meta.get("engine", "megatron"))
    try:
        engine.load_full_weights(checkpoint / "engine", model)
    except (*ckpt.LOAD_ERRORS, NotImplementedError) as e:  # the latter: a layout not read
        raise ckpt.CheckpointError(f"checkpoint {checkpoint} cannot be loaded: {e}") from e
    return model


def unpadded(state: dict[str, Tensor], vocab_size: int) -> dict[str, Tensor]:
    return {k: v[:vocab_size] if k in VOCAB_PARAMS else v for k, v in state.items()}


def with_heads(state: dict[str, Tensor], n_source: int, n: int) -> dict[str, Tensor]:
    """A full state of n_source heads as one of n: heads beyond n dropped, missing ones copies
    of head 1 (index 0)."""
    out = {k: v for k, v in state.items() if not k.startswith("heads.layers.")}
    for i in range(n):
        prefix = f"heads.layers.{i if i < n_source else 0}."
        for k, v in state.items():
            if k.startswith(prefix):
                out[f"heads.layers.{i}.{k[len(prefix) :]}"] = v
    return out
