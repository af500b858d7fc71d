"""A trained model for generation, from what training and export leave behind: a checkpoint
(a step_* directory, a checkpoints directory or a run directory: their latest), or a
consolidated export (`python -m mtp_dist.export`), with the tokenizer recorded in its config.

The model is built as one pipeline stage at this process group's tensor-parallel size; the
weights are resharded on load (dist_checkpointing, or full tensors cut into this rank's shards).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mtp_dist import checkpointing as ckpt
from mtp_dist import config as config_mod
from mtp_dist.errors import UserError


@dataclass
class Source:
    """What a checkpoint or an export says about its model, before any weight is read."""

    path: Path
    """The checkpoint directory or the export file."""
    config: dict
    """The resolved config the model was trained with."""
    step: int
    engine: str | None = None
    """The engine that wrote the checkpoint (None: an export of full tensors)."""
    tokenizer_hash: str | None = None
    """The identity of the tokenizer training used, if recorded."""
    state: dict | None = None
    """An export's full tensors (global names)."""


def read_source(path: str | Path) -> Source:
    """A consolidated export (a file), a Hugging Face Llama directory (`export --format hf`:
    with its sidecar heads, if any), else a checkpoint (find_checkpoint's rules)."""
    from mtp_dist.model import hf

    path = Path(path)
    if path.is_dir() and (path / hf.CONFIG).is_file():
        return _hf_source(path)
    if path.is_file():
        try:
            payload = ckpt.load_consolidated(path)
        except ckpt.LOAD_ERRORS as e:
            raise ckpt.CheckpointError(
                f"{path} cannot be read as an mtp-dist export ({e}): give a checkpoint directory "
                "or a file written by `python -m mtp_dist.export`"
            ) from e
        return Source(path, payload["config"], payload["step"], state=payload["state"])
    checkpoint = ckpt.find_checkpoint(path)
    meta = ckpt.read_meta(checkpoint)
    return Source(
        checkpoint,
        meta["config"],
        meta["step"],
        engine=meta.get("engine", "megatron"),
        tokenizer_hash=meta.get("tokenizer_hash"),
    )


def _hf_source(path: Path) -> Source:
    """A Llama directory as a source: its config and sidecar give the model, its
    tokenizer.model the tokenizer; the vocabulary is padded again as a model of ours pads it
    (padding rows are zero: decoding never chooses them)."""
    from mtp_dist.config import Config, DataConfig, ModelConfig
    from mtp_dist.model import hf
    from mtp_dist.model.weights import VOCAB_PARAMS

    d = hf.read_dir(path)
    m = ModelConfig(**{**d.fields, "n_future_tokens": d.n_future_tokens})
    state = hf.load_dir(d, m)
    for name in VOCAB_PARAMS:
        if name in state:
            padding = m.padded_vocab_size - state[name].shape[0]
            state[name] = torch.nn.functional.pad(state[name], (0, 0, 0, padding))
    tokenizer = path / "tokenizer.model"
    data = DataConfig(synthetic=True, tokenizer=str(tokenizer) if tokenizer.is_file() else None)
    config = Config(model=m, data=data).to_dict()
    return Source(path, config, 0, tokenizer_hash=d.tokenizer_hash, state=state)


def model_config(source: Source, tensor: int) -> config_mod.Config:
    """The source's config for one pipeline stage at tensor-parallel size `tensor` (validated:
    e.g. the padded vocabulary must divide over the ranks)."""
    data = dict(source.config)
    data["parallel"] = {"tensor": tensor, "pipeline": 1}
    return config_mod.from_dict(data)


def load_model(source: Source, cfg: config_mod.Config, dims, dtype=torch.float32):
    """The whole model (one stage, TP = the process group's) with the source's weights, in
    eval mode. Collective over the ranks."""
    from mtp_dist.engines import engine_class
    from mtp_dist.model.model import build_model
    from mtp_dist.model.weights import load_full

    model = build_model(cfg.model, tensor=dims.tp, dtype=dtype, device=dims.device)
    try:
        if source.state is not None:
            load_full(model, source.state)
        else:
            engine_class(source.engine).load_full_weights(source.path / "engine", model)
    except ckpt.LOAD_ERRORS as e:
        raise ckpt.CheckpointError(f"{source.path} cannot be loaded: {e}") from e
    return model.eval()


def load_tokenizer(
    source: Source, cfg: config_mod.Config, override: str | None = None, optional: bool = False
):
    """The tokenizer recorded with the model (data.tokenizer of its config), or `override`;
    refused if training recorded another tokenizer's identity, or its size differs. optional
    (export): None for a model trained without one (synthetic data) or for override "none"."""
    from data_prep.tokenizers import TokenizerError
    from data_prep.tokenizers import load_tokenizer as load

    fix = "give it with --tokenizer" + (" (or --tokenizer none)" if optional else "")
    if optional and override == "none":
        return None
    name = override or cfg.data.tokenizer
    if name is None:
        if optional and source.tokenizer_hash is None:
            return None
        raise UserError(
            f"{source.path} records no tokenizer (it was trained without data.tokenizer, e.g. on "
            f"synthetic data): {fix}"
        )
    if override is None and name != "byte" and not os.path.exists(name):
        raise UserError(
            f"the tokenizer {name!r} recorded with {source.path} does not exist here (a path "
            f"relative to where training ran?): {fix}"
        )
    try:
        tokenizer = load(name)
    except TokenizerError as e:
        raise UserError(f"the tokenizer {name!r} cannot be read ({e}): {fix}") from e
    if source.tokenizer_hash and tokenizer.identity_hash != source.tokenizer_hash:
        raise UserError(
            f"tokenizer {name!r} is not the one {source.path} was trained with (identity "
            f"{tokenizer.identity_hash[:12]}, trained with {source.tokenizer_hash[:12]}): give "
            "the training tokenizer with --tokenizer"
        )
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise UserError(
            f"tokenizer {name!r} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{cfg.model.vocab_size}: give the training tokenizer with --tokenizer"
        )
    return tokenizer
