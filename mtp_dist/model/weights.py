"""Full (unsharded) tensors <-> this rank's shards, by global parameter name.

A global name is the parameter's name in the single-process model: trunk layers are numbered
over all pipeline stages, and a tied unembedding is the embedding. The same mapping serves
layout-independent initialisation (`init_weights`: the same seed gives the same full weights at
any TP/PP layout), the consolidated export/import, and the equivalence tests (gathering
gradients). The SwiGLU fc1 weight is [gate; up] in full, and each TP rank holds [gate_r; up_r].
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from torch import Tensor

from mtp_dist.distributed import collective_device
from mtp_dist.model.model import MTPModel, total_layers

_TRUNK_LAYER = re.compile(r"^trunk\.layers\.(\d+)\.")

VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")
"""Global names whose rows are the (padded) vocabulary."""


@dataclass(frozen=True)
class ParamLayout:
    global_name: str
    full_shape: tuple[int, ...]
    partition_dim: int | None
    """None: replicated over tensor-parallel ranks."""
    gated: bool
    """SwiGLU fc1: each shard is [gate_r; up_r]."""


def layer_offset(model: MTPModel) -> int:
    """The global number of this stage's first trunk layer (0-based), for any split."""
    return get_transformer_layer_offset(model.config)


def global_name(model: MTPModel, name: str) -> str:
    if model.share_embeddings_and_output_weights and name == "output_layer.weight":
        return "embedding.word_embeddings.weight"
    m = _TRUNK_LAYER.match(name)
    if m:
        return f"trunk.layers.{int(m.group(1)) + layer_offset(model)}.{name[m.end() :]}"
    return name


def param_layout(model: MTPModel, name: str, p: Tensor) -> ParamLayout:
    """The layout of local parameter `name`, whose (TP-local) shape is p.shape."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    dim = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
    shape = list(p.shape)
    if dim is not None:
        shape[dim] *= tp
    gated = name.endswith("mlp.linear_fc1.weight") and model.config.gated_linear_unit
    return ParamLayout(global_name(model, name), tuple(shape), dim, gated)


def layouts(model: MTPModel) -> dict[str, ParamLayout]:
    """Local parameter name -> its layout."""
    return {name: param_layout(model, name, p) for name, p in model.named_parameters()}


def shard(full: Tensor, layout: ParamLayout, rank: int, world: int) -> Tensor:
    """This TP rank's piece of a full tensor."""
    if layout.partition_dim is None:
        return full
    if layout.gated:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(world, 0)[rank], up.chunk(world, 0)[rank]], dim=0)
    return full.chunk(world, dim=layout.partition_dim)[rank]


def unshard(pieces: list[Tensor], layout: ParamLayout) -> Tensor:
    """The full tensor from every TP rank's piece (in rank order)."""
    if layout.partition_dim is None:
        return pieces[0]
    if layout.gated:
        halves = [p.chunk(2, dim=0) for p in pieces]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(pieces, dim=layout.partition_dim)


def _init_std(model: MTPModel, name: str) -> float | None:
    """None for norm weights (ones); megatron's scaled init for the output projections unless
    model.init_scaled_output is false."""
    if "norm" in name.split(".")[-2]:  # input_layernorm, pre_mlp_layernorm, final_norm
        return None
    std = model.config.init_method_std
    scaled = model.model_cfg.init_scaled_output
    if scaled and name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        std = std / (2.0 * total_layers(model.model_cfg)) ** 0.5
    return std


@torch.no_grad()
def init_parameter(
    model: MTPModel, name: str, seed: int, source: Mapping[str, Tensor] | None = None
) -> None:
    """Initialise local parameter `name` from a full tensor drawn from a generator keyed by
    (seed, global name), keeping this rank's TP shard: identical full weights at any layout.
    The parameter must hold its TP-local values (an engine that partitions parameters
    gathers it around this call); only this one full tensor is ever materialised.

    source: full tensors by global name (model.init_from) that replace the drawn ones; a
    vocabulary tensor may have fewer rows (no padding, or another vocab_multiple's): the drawn
    values stay in the rows it lacks, which no token id reaches."""
    p = model.get_parameter(name)
    layout = param_layout(model, name, p)
    std = _init_std(model, layout.global_name)
    if std is None:
        full = torch.ones(layout.full_shape, dtype=torch.float32)
    else:
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed * 1_000_003 + zlib.crc32(layout.global_name.encode()))
        full = torch.empty(layout.full_shape, dtype=torch.float32)
        full.normal_(0.0, std, generator=gen)
    if source is not None:
        _copy_source(full, layout.global_name, source)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    p.copy_(shard(full, layout, tp_rank, tp).to(p.dtype))


def _copy_source(full: Tensor, name: str, source: Mapping[str, Tensor]) -> None:
    if name not in source:
        raise KeyError(f"the initial weights lack {name}")
    given = source[name]
    rows = full.shape[0] if name not in VOCAB_PARAMS else min(given.shape[0], full.shape[0])
    if tuple(given.shape) != (rows, *full.shape[1:]):
        raise ValueError(
            f"{name}: shape {tuple(given.shape)} in the initial weights, {tuple(full.shape)} in "
            "the model"
        )
    full[:rows] = given


def init_weights(model: MTPModel, seed: int, source: Mapping[str, Tensor] | None = None) -> None:
    """init_parameter for every parameter of a model whose parameters hold their values."""
    for name, _ in model.named_parameters():
        init_parameter(model, name, seed, source)


@torch.no_grad()
def load_full(model: MTPModel, state: dict[str, Tensor], strict: bool = True) -> None:
    """Copy full tensors (global names) into this rank's shards."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    lay = layouts(model)
    missing = [n for n, lo in lay.items() if lo.global_name not in state]
    if strict and missing:
        raise KeyError(
            f"the state lacks {lay[missing[0]].global_name} (and {len(missing) - 1} more)"
        )
    for name, layout in lay.items():
        if layout.global_name not in state:
            continue
        full = state[layout.global_name]
        if tuple(full.shape) != layout.full_shape:
            raise ValueError(
                f"{layout.global_name}: shape {tuple(full.shape)} in the state, "
                f"{layout.full_shape} in the model; the model config differs from the checkpoint's"
            )
        p = model.get_parameter(name)
        p.copy_(shard(full, layout, tp_rank, tp).to(device=p.device, dtype=p.dtype))


def gather_full(model: MTPModel, local: dict[str, Tensor]) -> dict[str, Tensor] | None:
    """Full tensors (global names, on CPU) from this rank's tensors keyed by local name (e.g.
    parameters or their gradients). Collective over the TP and PP groups of this data-parallel
    replica; returns the result on the replica's first pipeline stage, TP rank 0; else None."""
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    lay = layouts(model)
    mine = {}
    for name in sorted(local):
        t = local[name].detach().float().contiguous()
        if tp > 1:
            t = t.to(collective_device(tp_group))
            pieces = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(pieces, t, group=tp_group)
        else:
            pieces = [t]
        mine[lay[name].global_name] = unshard(pieces, lay[name]).cpu()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    is_root = parallel_state.get_tensor_model_parallel_rank() == 0
    if pp > 1:
        first = parallel_state.get_pipeline_model_parallel_first_rank()
        group = parallel_state.get_pipeline_model_parallel_group()
        gathered = [None] * pp if dist.get_rank() == first else None
        dist.gather_object(mine, gathered, dst=first, group=group)
        if dist.get_rank() != first:
            return None
        merged = {}
        for part in gathered:
            for k, v in part.items():
                merged.setdefault(k, v)
        mine = merged
    return mine if is_root else None


def full_state(model: MTPModel) -> dict[str, Tensor] | None:
    return gather_full(model, dict(model.named_parameters()))


def full_grads(model: MTPModel) -> dict[str, Tensor] | None:
    """Gradients as full tensors; reads megatron DDP's main_grad when present."""
    grads = {}
    for name, p in model.named_parameters():
        g = getattr(p, "main_grad", None)
        if g is None:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
        grads[name] = g
    return gather_full(model, grads)
