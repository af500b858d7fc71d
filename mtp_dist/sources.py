"""The only reader of a model source, and the checks every command that takes a model applies.

A model source is one of
- a checkpoint of either engine, any TP/PP/DP layout: a step_* directory, or a checkpoints or
  run directory (their latest);
- an export of `python -m mtp_dist.export` (.pt): full tensors by global name, the config, the
  step and the identity of the tokenizer training used;
- a Hugging Face Llama directory (`export --format hf`, or any Llama this model's layer can be):
  its config.json gives the model and its context (max_position_embeddings), its sidecar the
  extra heads, its tokenizer.model or mtp_dist.json the tokenizer's identity.

`open_source(path)` reads what a source is without its tensors and returns a ModelSource: its
config (the model, the context, the tokenizer name it was trained with), step, engine and
tokenizer identity; `full_state()` and `load_into(model)` give the weights on demand. Every
consumer (generate, export, model.init_from, evaluation) applies the same checks through
`check_tokenizer`, `check_context` and `check_vocabulary`, and reads its tokenizer with
`load_tokenizer`; so the same model gives the same answers whichever of its forms is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from mtp_dist import checkpointing as ckpt
from mtp_dist import config as config_mod
from mtp_dist.config import Config, ModelConfig
from mtp_dist.errors import UserError

KIND_NAMES = {"checkpoint": "checkpoint", "export": "export", "hf": "Hugging Face directory"}
GIVE = (
    "give a checkpoint (a step_* directory, a checkpoints or run directory), an export of "
    "`python -m mtp_dist.export` (.pt) or a Hugging Face Llama directory"
)


class SourceError(UserError, ValueError):
    """A model source that cannot be read or does not fit its use; names the source and the fix."""


@dataclass
class ModelSource:
    """What a model source is, read without its tensors."""

    path: Path
    """The checkpoint directory (resolved to its step), the export file or the Llama directory."""
    kind: str
    """checkpoint, export or hf."""
    config: Config
    """The config the model was trained with, at TP1 x PP1 (for a Llama directory: the model its
    config.json implies, data.tokenizer its tokenizer)."""
    step: int
    engine: str | None
    """The engine that wrote a checkpoint; None for full tensors (export, Llama directory)."""
    tokenizer_hash: str | None
    """The identity hash of the tokenizer the model was trained with (data_prep's), if known."""
    what: str = ""
    """How messages name the source's role, e.g. "model.init_from"."""
    _llama: object | None = field(default=None, repr=False)
    _state: dict | None = field(default=None, repr=False)

    @property
    def model(self) -> ModelConfig:
        return self.config.model

    @property
    def context(self) -> int:
        """The longest sequence the model was trained on (model.seq_length): positions beyond
        it were never seen, so no consumer goes past it."""
        return self.config.model.seq_length

    @property
    def tokenizer_name(self) -> str | None:
        """The tokenizer recorded with the model (data.tokenizer: `byte` or a path), if any."""
        return self.config.data.tokenizer

    def describe(self) -> str:
        return " ".join(filter(None, (self.what, KIND_NAMES[self.kind], str(self.path))))

    def config_at(self, tensor: int) -> Config:
        """The source's config for one pipeline stage at tensor-parallel size `tensor`."""
        data = self.config.to_dict()
        data["parallel"] = {"tensor": tensor, "pipeline": 1}
        try:
            return config_mod.from_dict(data)
        except config_mod.ConfigError as e:
            raise SourceError(f"{self.describe()} cannot run on {tensor} ranks: {e}") from e

    def full_state(self, seed: int = 0) -> dict[str, Tensor]:
        """Full tensors by global name, the vocabulary without padding (vocab_size rows). A
        checkpoint is read in a TP1 x PP1 process group of this process alone (the current one
        if it is such a group, else one made for the purpose)."""
        if self._state is not None:
            state = self._state
        elif self.kind == "hf":
            from mtp_dist.model import hf_dir

            state = hf_dir.load_dir(self._llama, self.model)
        else:
            state = self._checkpoint_state(seed)
        vocab = self.model.vocab_size
        return {k: v[:vocab] if k in _vocab_params() else v for k, v in state.items()}

    def load_into(self, model) -> None:
        """The source's weights into `model`, built from config_at(this group's TP size) as one
        pipeline stage (collective over its ranks): a checkpoint resharded by its engine, full
        tensors cut into this rank's shards."""
        from mtp_dist.model.weights import load_full

        try:
            if self.kind == "checkpoint":
                self._engine().load_full_weights(self.path / "engine", model)
            else:
                padding = model.model_cfg.padded_vocab_size - self.model.vocab_size
                state = {
                    k: torch.nn.functional.pad(v, (0, 0, 0, padding)) if k in _vocab_params() else v
                    for k, v in self.full_state().items()
                }
                load_full(model, state)
        except UserError:
            raise  # says what is wrong itself (a Llama directory's HFFormatError)
        except (*ckpt.load_errors(), NotImplementedError) as e:  # the latter: a layout not read
            raise ckpt.CheckpointError(
                f"{self.describe()} cannot be loaded ({ckpt.load_error(e)}): it is damaged or "
                "incomplete; use another checkpoint or export it again"
            ) from e

    def _engine(self):
        from mtp_dist.engines import engine_class

        return engine_class(self.engine)

    def _checkpoint_state(self, seed: int) -> dict[str, Tensor]:
        import torch.distributed as dist
        from megatron.core import parallel_state

        from mtp_dist import distributed
        from mtp_dist.model.model import build_model
        from mtp_dist.model.weights import full_state

        def read():
            model = build_model(self.model)
            self.load_into(model)
            return full_state(model)

        if dist.is_initialized() and parallel_state.get_tensor_model_parallel_world_size() == 1:
            if parallel_state.get_pipeline_model_parallel_world_size() == 1:
                return read()
        with distributed.single_process(seed):
            return read()


def _vocab_params():
    from mtp_dist.model.weights import VOCAB_PARAMS

    return VOCAB_PARAMS


def open_source(path: str | os.PathLike, what: str = "") -> ModelSource:
    """What `path` holds, checked, without its tensors (an export's are memory-mapped). what:
    the source's role in messages (e.g. "model.init_from")."""
    path = Path(path)
    named = f"{what}={path}" if what else str(path)
    if not path.exists():
        raise SourceError(f"{named} does not exist: {GIVE}")
    if path.is_file():
        return _export(path, what)
    from mtp_dist.model import hf

    if (path / hf.CONFIG).is_file():
        return _llama(path, what)
    try:
        checkpoint = ckpt.find_checkpoint(path)
    except ckpt.CheckpointError as e:
        raise SourceError(
            f"{named} is no Hugging Face directory (it has no {hf.CONFIG}), and {e}"
        ) from e
    meta = ckpt.read_meta(checkpoint)
    cfg = _config(meta["config"], checkpoint)
    engine = meta.get("engine", "megatron")
    if not isinstance(engine, str):
        raise ckpt.CheckpointError(f"{checkpoint}/{ckpt.META} is corrupt (engine={engine!r})")
    tokenizer_hash = _hash(meta.get("tokenizer_hash"), checkpoint / ckpt.META)
    return ModelSource(checkpoint, "checkpoint", cfg, meta["step"], engine, tokenizer_hash, what)


def _export(path: Path, what: str) -> ModelSource:
    payload = ckpt.load_consolidated(path)
    cfg = _config(payload["config"], path)
    tokenizer_hash = _hash(payload.get("tokenizer_hash"), path)
    return ModelSource(
        path, "export", cfg, payload["step"], None, tokenizer_hash, what, _state=payload["state"]
    )


def _llama(path: Path, what: str) -> ModelSource:
    from mtp_dist.model import hf_dir

    d = hf_dir.read_dir(path)
    model = {**d.fields, "n_future_tokens": d.n_future_tokens, "seq_length": d.context}
    cfg = _config({"model": model, "data": {"synthetic": True, "tokenizer": d.tokenizer}}, path)
    return ModelSource(path, "hf", cfg, d.step, None, d.tokenizer_hash, what, _llama=d)


def _config(data: object, where: Path) -> Config:
    if not isinstance(data, dict):
        raise SourceError(f"{where} records no config (a mapping): it is damaged; export it again")
    data = {**data, "parallel": {"tensor": 1, "pipeline": 1}}
    try:
        return config_mod.from_dict(data)
    except config_mod.ConfigError as e:
        raise SourceError(f"{where} records a config that does not load: {e}") from e


def _hash(value: object, where: Path) -> str | None:
    if value is None or (isinstance(value, str) and len(value) == 64):
        return value
    raise SourceError(f"{where} records a tokenizer identity that is no sha256 hex ({value!r})")


def check_tokenizer(source: ModelSource, identity_hash: str | None, other: str, fix: str) -> None:
    """Refuse a tokenizer (identity_hash; `other` names where it comes from) that is not the one
    the model was trained with, where both are known."""
    if source.tokenizer_hash and identity_hash and identity_hash != source.tokenizer_hash:
        raise SourceError(
            f"{source.describe()} was trained with tokenizer {source.tokenizer_hash[:12]}, but "
            f"{other} is tokenizer {identity_hash[:12]}: {fix}"
        )


def check_context(source: ModelSource, length: int, what: str, fix: str) -> None:
    """Refuse a sequence of `length` tokens (`what`) longer than the model's context."""
    if length > source.context:
        raise SourceError(
            f"{what} is {length} tokens, but {source.describe()} has a context of "
            f"{source.context} tokens (model.seq_length): {fix}"
        )


def check_vocabulary(source: ModelSource, vocab_size: int, what: str, fix: str) -> None:
    """Refuse a vocabulary (`what`) of another size than the model's."""
    if vocab_size != source.model.vocab_size:
        raise SourceError(
            f"{what} has {vocab_size} tokens, but {source.describe()} has a vocabulary of "
            f"{source.model.vocab_size} (model.vocab_size): {fix}"
        )


def load_tokenizer(source: ModelSource, override: str | None = None, optional: bool = False):
    """The tokenizer to encode for the model: `override` (--tokenizer), else the one recorded
    with it; refused if it is not the tokenizer training used or its vocabulary differs.
    optional (export): None for a model without a recorded tokenizer, or override "none"."""
    from data_prep.tokenizers import TokenizerError
    from data_prep.tokenizers import load_tokenizer as load

    fix = "give it with --tokenizer" + (" (or --tokenizer none)" if optional else "")
    if optional and override == "none":
        return None
    name = override or source.tokenizer_name
    if name is None:
        if optional and source.tokenizer_hash is None:
            return None
        raise SourceError(
            f"{source.describe()} records no tokenizer file (e.g. it was trained on synthetic "
            f"data, or exported without one): {fix}"
        )
    if override is None and name != "byte" and not os.path.exists(name):
        raise SourceError(
            f"the tokenizer {name!r} recorded with {source.describe()} does not exist here (a "
            f"path relative to where training ran?): {fix}"
        )
    try:
        tokenizer = load(name)
    except TokenizerError as e:
        raise SourceError(f"the tokenizer {name!r} cannot be read ({e}): {fix}") from e
    again = "give the training tokenizer with --tokenizer"
    check_tokenizer(source, tokenizer.identity_hash, f"--tokenizer {name!r}", again)
    check_vocabulary(source, tokenizer.vocab_size, f"tokenizer {name!r}", again)
    return tokenizer


def with_heads(state: dict[str, Tensor], n_source: int, n: int) -> dict[str, Tensor]:
    """A full state of n_source heads as one of n: heads beyond n dropped, missing ones copies
    of head 1 (index 0; its layer predicts the next token: the paper's Section 3.6)."""
    out = {k: v for k, v in state.items() if not k.startswith("heads.layers.")}
    for i in range(n):
        prefix = f"heads.layers.{i if i < n_source else 0}."
        for k, v in state.items():
            if k.startswith(prefix):
                out[f"heads.layers.{i}.{k[len(prefix) :]}"] = v
    return out
