"""What each pipeline stage of the model holds and computes, for a given split of the trunk's
layers over the stages: parameters (on one tensor-parallel rank, and over the stage) and
training FLOPs per token (heads and their unembeddings included on the last stage).

Pure arithmetic on the ModelConfig, composed from the parts' own statements (the layer's in
spec.py, the head type's in HEADS), so a planner or a stage balancer can price any split
without building anything. tests/test_plan.py checks every count against the model built on
the meta device at many layouts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mtp_dist.config import ModelConfig
from mtp_dist.model.model import HEADS
from mtp_dist.model.spec import layer_flops_per_token, layer_parameters


@dataclass(frozen=True)
class StageCost:
    index: int
    trunk_layers: int
    first: bool
    """Holds the token embedding."""
    last: bool
    """Holds the heads, the final norm and the unembedding."""
    params_per_rank: int
    """Parameters on each of the stage's tensor-parallel ranks (replicated norms included)."""
    params: int
    """Parameters of the stage over its tensor-parallel ranks (replicated ones counted once)."""
    flops_per_token: float
    """Training FLOPs (forward + backward) per token of the stage, over its tensor-parallel
    ranks; without activation recomputation."""


def even_split(m: ModelConfig, pipeline: int) -> tuple[int, ...]:
    """The trunk layers of each stage as build_model places them: the same number on every
    stage (the config refuses a depth the pipeline does not divide)."""
    if m.num_layers % pipeline:
        raise ValueError(f"{m.num_layers} trunk layers do not split evenly over {pipeline} stages")
    return (m.num_layers // pipeline,) * pipeline


def embedding_parameters(m: ModelConfig, tensor: int = 1) -> int:
    """The vocab-parallel token embedding on one tensor-parallel rank (padded vocabulary)."""
    return m.padded_vocab_size * m.hidden_size // tensor


def unembedding_held(m: ModelConfig, pipeline: int) -> bool:
    """Whether the last stage holds an unembedding weight of its own: always when untied; when
    tied, only if the embedding lives on another stage (megatron-core keeps a copy there and
    keeps the two in sync)."""
    return not m.tie_embeddings or pipeline > 1


def stage_costs(
    m: ModelConfig, tensor: int = 1, split: Sequence[int] | None = None
) -> list[StageCost]:
    """Every pipeline stage's parameters and FLOPs; split: trunk layers per stage (default: one
    stage)."""
    split = tuple(split) if split is not None else (m.num_layers,)
    if sum(split) != m.num_layers or min(split) < 0:
        raise ValueError(f"split {split} does not place the {m.num_layers} trunk layers")
    pipeline = len(split)
    stages = []
    for i, layers in enumerate(split):
        first, last = i == 0, i == pipeline - 1
        per_rank, whole = layers * layer_parameters(m, tensor), layers * layer_parameters(m)
        flops = layers * layer_flops_per_token(m)
        if first:
            per_rank += embedding_parameters(m, tensor)
            whole += embedding_parameters(m)
        if last:
            per_rank += HEADS.num_parameters(m, tensor)
            whole += HEADS.num_parameters(m)
            if unembedding_held(m, pipeline):
                per_rank += embedding_parameters(m, tensor)
                whole += embedding_parameters(m)
            flops += HEADS.flops_per_token(m)
        stages.append(StageCost(i, layers, first, last, per_rank, whole, flops))
    return stages


def parameter_breakdown(m: ModelConfig) -> dict[str, int]:
    """The model's distinct parameters (a tied unembedding counted once) by part."""
    embedding = embedding_parameters(m)
    unembedding = 0 if m.tie_embeddings else embedding
    trunk = m.num_layers * layer_parameters(m)
    heads = HEADS.num_parameters(m)
    return {
        "total": embedding + unembedding + trunk + heads,
        "embedding": embedding,
        "unembedding": unembedding,
        "trunk": trunk,
        "heads": heads,
    }


def largest_module_parameters(m: ModelConfig, tensor: int = 1) -> int:
    """The most parameters any one module holds directly on a tensor-parallel rank (what ZeRO-3
    gathers at once): the embedding or unembedding, or a layer's qkv, proj, fc1 or fc2."""
    h, f, hn = m.hidden_size, m.ffn_size, m.hidden_size // m.num_attention_heads
    groups = m.num_query_groups or m.num_attention_heads
    linears = ((m.num_attention_heads + 2 * groups) * hn * h, h * h, 2 * f * h, f * h)
    return max(embedding_parameters(m, tensor), *(w // tensor for w in linears))
