"""model.init_from: another model's weights as the start of a new run (weights only: the
optimizer is fresh and the run starts at step 0).

The source is any model source (sources.py: a Hugging Face Llama directory, ours or any Llama
whose shapes match the config, an export, or a checkpoint of either engine and any layout).
`inspect` reads it without its tensors and `check` compares it with the config, so preflight
refuses a mismatch before any compute; `load` gives its full tensors by global name for the
configured model, which the engine writes into the run's layout (weights.init_parameter):

- the trunk, the final norm, the embedding and unembedding as they are (the vocabulary without
  padding: the rows the config's padding adds keep their random values, no token reaches them);
- heads 1..min(n, n_source) as they are; further heads are copies of head 1, whose layer
  predicts the next token (the paper's Section 3.6 adds or drops heads this way).
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from mtp_dist import sources
from mtp_dist.config import Config, ModelConfig
from mtp_dist.model import hf
from mtp_dist.sources import ModelSource

WHAT = "model.init_from"


def inspect(path: str | Path) -> ModelSource:
    """What `path` holds, checked, without its tensors."""
    return sources.open_source(path, WHAT)


def check(source: ModelSource, cfg: Config, tokenizer_hash: str | None) -> None:
    """The source fits the configured model (all but the number of heads), within its context
    and vocabulary, and was trained with the run's tokenizer, where both are known: the checks
    every consumer of a model applies (sources.py)."""
    sources.check_vocabulary(
        source,
        cfg.model.vocab_size,
        "model.vocab_size",
        f"set model.vocab_size={source.model.vocab_size} and use data made with its tokenizer",
    )
    sources.check_context(
        source,
        cfg.model.seq_length,
        f"model.seq_length={cfg.model.seq_length}",
        f"set model.seq_length <= {source.context}: its positions beyond were never trained",
    )
    hf.check_matches(hf.effective_fields(source.model), cfg.model, source.describe())
    sources.check_tokenizer(
        source, tokenizer_hash, "the data's", "use data made with the model's tokenizer"
    )


def load(source: ModelSource, m: ModelConfig, seed: int = 0) -> dict[str, Tensor]:
    """The source's full tensors for model config m (see the module's docstring). A checkpoint
    is read in a process group of this process alone: call it before the run's own exists."""
    state = source.full_state(seed)
    return sources.with_heads(state, source.model.n_future_tokens, m.n_future_tokens)
