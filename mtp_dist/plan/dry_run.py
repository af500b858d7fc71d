"""A dry run at cluster size in one process: megatron-core's process groups for the whole world
stood up on torch's fake process group (as torchtitan's dry runs do), then for every (tensor,
pipeline) position that rank's stage built on the meta device and its sharded state dict taken.

Checks, each a DryRunError naming what is wrong:
- each position holds exactly the parameters the planner counts for its stage;
- the main replicas of all positions' sharded tensors tile every full parameter exactly once
  (no gap, no overlap), and every other replica repeats a main one;
- the embedding only on the first stage, the heads and the unembedding only on the last;
- the distinct parameters sum to the planner's total.
With engine=deepspeed and ZeRO-3 it also gives each data-parallel rank's partition sizes.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

from mtp_dist.config import Config
from mtp_dist.model.costs import parameter_breakdown, pipeline_split, stage_costs
from mtp_dist.run_plan import RunPlan

LAST_STAGE_PREFIXES = ("heads.", "output_layer.")
FIRST_STAGE_PREFIXES = ("embedding.",)


class DryRunError(AssertionError):
    """The built model disagrees with the plan: a bug, not a user error."""


def global_rank(tp_rank: int, pp_rank: int, tp: int, dp: int, dp_rank: int = 0) -> int:
    """The rank of a position in megatron-core's default order (tp fastest, then dp, then pp;
    context and expert parallelism are 1)."""
    return tp_rank + tp * (dp_rank + dp * pp_rank)


@contextmanager
def fake_world(rank: int, world: int, tp: int, pp: int):
    """torch.distributed and megatron-core's groups as `rank` of `world` sees them, with no
    other process (every collective is a no-op)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        # Gloo groups cannot be made on the fake backend (not implemented there).
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            create_gloo_process_groups=False,
        )
        yield parallel_state
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def _sharded_tensors(state):
    """The ShardedTensors of a sharded state dict, factories built (megatron-core saves the
    SwiGLU fc1 weight through one, as its two halves)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    values = state.values() if isinstance(state, dict) else state
    for value in values:
        if isinstance(value, ShardedTensor):
            yield value
        elif isinstance(value, ShardedTensorFactory):
            yield from _sharded_tensors(value.build())
        elif isinstance(value, (dict, list, tuple)):
            yield from _sharded_tensors(value)


def _box(t) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offset, shape) of a sharded tensor's chunk in its global tensor."""
    if t.flattened_range is not None:
        raise DryRunError(f"{t.key}: flattened shards are not expected in a model state dict")
    shape = (1,) * t.prepend_axis_num + tuple(t.local_shape)
    return tuple(t.global_offset), shape


def _overlap(a, b) -> bool:
    (oa, sa), (ob, sb) = a, b
    return all(x < y + ly and y < x + lx for x, lx, y, ly in zip(oa, sa, ob, sb, strict=True))


def check_tiling(chunks: dict[str, list]) -> int:
    """Every key's main chunks cover its global shape exactly once; returns the number of
    distinct elements (parameters)."""
    total = 0
    for key, items in chunks.items():
        shapes = {tuple(t.global_shape) for t, _ in items}
        if len(shapes) != 1:
            raise DryRunError(f"{key}: positions disagree on the global shape: {sorted(shapes)}")
        (shape,) = shapes
        main = [_box(t) for t, _ in items if not any(_replica(t))]
        for i, (off, size) in enumerate(main):
            if any(o < 0 or o + n > g for o, n, g in zip(off, size, shape, strict=True)):
                raise DryRunError(f"{key}: a chunk at {off} of shape {size} leaves {shape}")
            for other in main[:i]:
                if _overlap((off, size), other):
                    raise DryRunError(f"{key}: chunks at {off} and {other[0]} overlap")
        covered = sum(math.prod(size) for _, size in main)
        if covered != math.prod(shape):
            raise DryRunError(f"{key}: main chunks cover {covered} of {math.prod(shape)} elements")
        main_set = set(main)
        for t, where in items:
            if any(_replica(t)) and _box(t) not in main_set:
                raise DryRunError(f"{key}: the replica at {where} repeats no main chunk")
        total += covered
    return total


def _replica(t) -> tuple[int, ...]:
    r = t.replica_id
    return tuple(r) if isinstance(r, tuple) else (r,)


def zero3_partitions(numels: list[int], dp: int) -> tuple[int, int]:
    """(elements each data-parallel rank holds, padding) for parameters of `numels` under
    ZeRO-3: DeepSpeed pads every parameter to a multiple of the data-parallel size and gives
    each rank one equal slice (partition_parameters.Init._aligned_size / _partition_param)."""
    per_rank = sum(-(-n // dp) for n in numels)
    return per_rank, per_rank * dp - sum(numels)


def dry_run(cfg: Config, run: RunPlan) -> dict:
    """Builds every (tp, pp) position of `run`'s world (data-parallel rank 0: the others hold
    the same shapes) and checks it against the planner; returns what it found."""
    import torch.distributed as dist

    from mtp_dist.model.model import build_model

    if dist.is_initialized():
        raise RuntimeError("the dry run needs a process without a process group")
    if not torch.cuda.is_available():
        from mtp_dist.compat import cpu

        cpu.apply()
    start = time.perf_counter()
    m, tp, pp, dp = cfg.model, run.tp, run.pp, run.dp
    split = pipeline_split(m, cfg.parallel)
    costs = stage_costs(m, tp, split)
    chunks: dict[str, list] = defaultdict(list)
    positions, zero3 = [], []
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            rank = global_rank(tp_rank, pp_rank, tp, dp)
            with fake_world(rank, run.world_size, tp, pp) as ps:
                got = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank())
                if got != (tp_rank, pp_rank) or ps.get_data_parallel_world_size() != dp:
                    raise DryRunError(
                        f"rank {rank}: megatron-core places it at (tp, pp) {got}, data-parallel "
                        f"size {ps.get_data_parallel_world_size()}; expected "
                        f"{(tp_rank, pp_rank)}, {dp}"
                    )
                model = build_model(
                    m, tp, pp, pp_rank, run.torch_dtype, "meta", cfg.train.recompute, split
                )
                numels = [p.numel() for p in model.parameters()]
                if sum(numels) != costs[pp_rank].params_per_rank:
                    raise DryRunError(
                        f"rank {rank} (pp {pp_rank}) holds {sum(numels):,} parameters; the "
                        f"planner counts {costs[pp_rank].params_per_rank:,}"
                    )
                state = model.sharded_state_dict()
            tensors = list(_sharded_tensors(state))
            for t in tensors:
                if t.key.startswith(LAST_STAGE_PREFIXES) and pp_rank != pp - 1:
                    raise DryRunError(f"{t.key} on pipeline stage {pp_rank} of {pp}")
                if t.key.startswith(FIRST_STAGE_PREFIXES) and pp_rank != 0:
                    raise DryRunError(f"{t.key} on pipeline stage {pp_rank} of {pp}")
                chunks[t.key].append((t, (tp_rank, pp_rank)))
            positions.append(
                {
                    "rank": rank,
                    "tp_rank": tp_rank,
                    "pp_rank": pp_rank,
                    "params": sum(numels),
                    "sharded_tensors": len(tensors),
                }
            )
            if tp_rank == 0:
                zero3.append(zero3_partitions(numels, dp))
    total = check_tiling(chunks)
    expected = parameter_breakdown(m)["total"]
    if total != expected:
        raise DryRunError(
            f"the sharded state dicts hold {total:,} parameters; planned {expected:,}"
        )
    for prefix in LAST_STAGE_PREFIXES:
        if not any(k.startswith(prefix) for k in chunks) and (
            prefix == "heads." or not m.tie_embeddings
        ):
            raise DryRunError(f"no {prefix}* tensor on the last stage")
    result = {
        "world": run.world_size,
        "tensor": tp,
        "pipeline": pp,
        "pipeline_layers": list(split),
        "data": dp,
        "positions": positions,
        "keys": len(chunks),
        "total_params": total,
        "seconds": round(time.perf_counter() - start, 2),
    }
    if cfg.engine == "deepspeed" and cfg.deepspeed.zero_stage == 3:
        result["zero3"] = {
            "dp": dp,
            "partition_numel_per_stage": [z[0] for z in zero3],
            "padding_per_stage": [z[1] for z in zero3],
            "partition_numel_max": max(z[0] for z in zero3),
            "padding_max": max(z[1] for z in zero3),
        }
    return result
