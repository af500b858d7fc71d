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

from mtp_dist.config import ModelConfig, ParallelConfig
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
    """The same number of trunk layers on every stage (parallel.pipeline_layers=even; the
    config refuses it for a depth the pipeline does not divide)."""
    if m.num_layers % pipeline:
        raise ValueError(f"{m.num_layers} trunk layers do not split evenly over {pipeline} stages")
    return (m.num_layers // pipeline,) * pipeline


def balanced_split(m: ModelConfig, pipeline: int) -> tuple[int, ...]:
    """The split (>= 1 layer per stage) whose slowest stage has the fewest training FLOPs per
    token, the heads and unembeddings counted on the last stage (parallel.pipeline_layers=auto).

    Among the splits with that bottleneck it is the one reached by giving every stage as many
    layers as the bottleneck allows, then taking the surplus back one layer at a time from the
    currently costliest stage, the later stage first on a tie: the rest stays as level as the
    integers allow, and earlier stages keep any extra layer.
    """
    layers = m.num_layers
    if pipeline == 1:
        return (layers,)
    if layers < pipeline:
        raise ValueError(f"{layers} trunk layers cannot give each of {pipeline} stages one")

    # FLOPs depend on a stage's place (first, middle, last) and its layer count only.
    def flops(i: int, k: int) -> float:
        return _stage(m, 1, i, pipeline, k).flops_per_token

    table = [[flops(i, k) for k in range(layers + 1)] for i in range(pipeline)]

    def caps(bound: float) -> list[int]:
        return [max((k for k in range(layers + 1) if row[k] <= bound), default=0) for row in table]

    def feasible(bound: float) -> bool:
        c = caps(bound)
        return min(c) >= 1 and sum(c) >= layers

    bounds = sorted({row[k] for row in table for k in range(1, layers + 1)})
    lo, hi = 0, len(bounds) - 1  # the largest bound always fits: one layer on all but one
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if feasible(bounds[mid]) else (mid + 1, hi)
    split = caps(bounds[lo])
    for _ in range(sum(split) - layers):
        movable = [i for i in range(pipeline) if split[i] > 1]
        i = max(movable, key=lambda i: (table[i][split[i]], i))
        split[i] -= 1
    return tuple(split)


def pipeline_split(m: ModelConfig, p: ParallelConfig) -> tuple[int, ...]:
    """The trunk layers of each pipeline stage that parallel.pipeline_layers asks for."""
    if p.pipeline == 1:
        return (m.num_layers,)
    if p.pipeline_layers == "even":
        return even_split(m, p.pipeline)
    if p.pipeline_layers == "auto":
        return balanced_split(m, p.pipeline)
    return tuple(p.pipeline_layers)


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
    return [_stage(m, tensor, i, len(split), layers) for i, layers in enumerate(split)]


def _stage(m: ModelConfig, tensor: int, i: int, pipeline: int, layers: int) -> StageCost:
    """Stage i of `pipeline` holding `layers` trunk layers."""
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
    return StageCost(i, layers, first, last, per_rank, whole, flops)


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
