"""Worker run under torchrun by tests/test_overlap.py.

Each case trains the tiny MTP model (configs/tiny.yaml) with one engine and one overlap setting
on the same deterministic global batches, several microbatches per rank. Megatron counts each
gradient hook's calls in the first step and overlaps the reduction only from the second, so
every case runs two steps: the first through the engine's train_step, the second's forward
and backward only (megatron engine), after which rank 0 saves the data-parallel reduced gradients as
full tensors (megatron engine), the weights the optimizer steps produced, and every step's
loss, head losses and grad norm, to OUT/<case name>.pt, with the parameters' dtypes (and the
megatron engine's gradient buffers and main parameters) and any dtype warning of the steps. A
resume case checks that a checkpoint saved with one overlap setting (bucket layout) continues
exactly with another. Many cases per launch keep it fast.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

import torch
import torch.distributed as dist

from mtp_dist.compat import ignore_known_warnings  # noqa: E402

ignore_known_warnings()

from megatron.core import parallel_state  # noqa: E402
from megatron.core.distributed.param_and_grad_buffer import shard_buffer  # noqa: E402

from mtp_dist import config as C  # noqa: E402
from mtp_dist import distributed, engines  # noqa: E402
from mtp_dist.engines.megatron import HEADS_PREFIXES  # noqa: E402
from mtp_dist.model.weights import full_grads, full_state  # noqa: E402
from mtp_dist.run_plan import resolve  # noqa: E402

SEED = 5
STEPS = 2


def my_microbatches(cfg: C.Config, dims, step: int) -> list[dict]:
    m, t = cfg.model, cfg.train
    gen = torch.Generator().manual_seed(2000 + step)
    tokens = torch.randint(
        0, m.vocab_size, (t.global_batch_size, m.seq_length + m.n_future_tokens), generator=gen
    )
    per = t.global_batch_size // dims.dp
    mine = tokens[dims.dp_rank * per : (dims.dp_rank + 1) * per]
    return [{"tokens": x} for x in mine.split(t.micro_batch_size)]


def dp_mean(dims, values: list[float], size: int) -> list[float]:
    stats = torch.zeros(size, dtype=torch.float64)
    if dims.is_last_stage and dims.tp_rank == 0:
        stats = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(stats)
    return (stats / dims.dp).tolist()


def reduced_grads(engine) -> dict:
    """The full data-parallel reduced gradients: the distributed optimizer's reduce-scatter
    leaves each rank its shard of every bucket; gather the shards back into the buckets."""
    group = parallel_state.get_data_parallel_group()
    rank, size = group.rank(), group.size()
    for buffer in engine.ddp.buffers:
        for bucket in buffer.buckets:
            shards = list(shard_buffer(bucket.grad_data, size))
            mine = shards[rank].clone()
            dist.all_gather(shards, mine, group=group)
    return full_grads(engine.model)


def trace_reductions(engine) -> list:
    """Records, in order, each gradient megatron DDP registers as ready while grad sync is on
    (whether it is a head's) and each bucket reduction it starts (whether of heads only)."""
    names = {p: name for name, p in engine.model.named_parameters()}
    events = []

    def traced(group):
        heads_only = all(names[p].startswith(HEADS_PREFIXES) for p in group.params)
        register, start = group.register_grad_ready, group.start_grad_sync

        def register_grad_ready(param, *args, **kwargs):
            if group.is_last_microbatch:
                events.append(("ready", names[param].startswith(HEADS_PREFIXES)))
            return register(param, *args, **kwargs)

        def start_grad_sync(*args, **kwargs):
            events.append(("start", heads_only))
            return start(*args, **kwargs)

        group.register_grad_ready = register_grad_ready
        group.start_grad_sync = start_grad_sync

    for group in engine.ddp.bucket_groups:
        traced(group)
    return events


def bucket_params(engine) -> list[list[str]]:
    """Each bucket group's parameter names, in megatron's order of the groups."""
    names = {p: name for name, p in engine.model.named_parameters()}
    return [sorted(names[p] for p in g.params) for g in engine.ddp.bucket_groups]


def load_config(case: dict, engine_name: str, extra: list[str]) -> C.Config:
    overrides = [
        f"engine={engine_name}",
        f"train.seed={SEED}",
        f"parallel.tensor={case.get('tp', 1)}",
        f"parallel.pipeline={case.get('pp', 1)}",
        f"model.n_future_tokens={case['n']}",
        "model.head_backward=sequential",
        # 8 samples, microbatches of 1: 4 per rank at DP2.
        "train.micro_batch_size=1",
        # The first step updates the weights (no warm-up from lr 0).
        "train.warmup_steps=0",
        *extra,
    ]
    return C.load("configs/tiny.yaml", overrides)


def run_resume_case(case: dict, out_dir: str) -> None:
    """Step 0 with case["save"]'s overlap settings and a checkpoint, then step 1 twice: on
    that engine, and on a fresh engine with case["load"]'s settings (another bucket layout)
    loaded from the checkpoint. Saves both weights after step 1."""
    cfg = load_config(case, "megatron", case["save"])
    dims = distributed.init(1, 1, seed=SEED)
    plan = resolve(cfg, dims.world_size, on_gpu=False)
    engine = engines.build_engine(cfg, plan, dims, engines.build_model(cfg, plan, dims))
    engine.train_step(my_microbatches(cfg, dims, 0))
    directory = os.path.join(out_dir, case["name"] + "_checkpoint")
    if dims.rank == 0:
        os.makedirs(directory)
    dist.barrier()
    engine.save(directory)
    engine.train_step(my_microbatches(cfg, dims, 1))
    engine.sync_params()
    continued = full_state(engine.model)
    cfg = load_config(case, "megatron", case["load"])
    plan = resolve(cfg, dims.world_size, on_gpu=False)
    resumed = engines.build_engine(cfg, plan, dims, engines.build_model(cfg, plan, dims))
    resumed.load(directory)
    resumed.train_step(my_microbatches(cfg, dims, 1))
    resumed.sync_params()
    payload = {"continued": continued, "resumed": full_state(resumed.model)}
    if dims.rank == 0:
        torch.save(payload, os.path.join(out_dir, case["name"] + ".pt"))
    dist.barrier()


def run_case(case: dict, out_dir: str) -> None:
    engine_name = case.get("engine", "megatron")
    cfg = load_config(case, engine_name, case.get("overrides", []))
    p = cfg.parallel
    dims = distributed.init(p.tensor, p.pipeline, seed=SEED)
    plan = resolve(cfg, dims.world_size, on_gpu=False)
    engines.check_config(cfg, plan)
    model = engines.build_model(cfg, plan, dims)
    engine = engines.build_engine(cfg, plan, dims, model)
    n = cfg.model.n_future_tokens
    steps = case.get("steps", STEPS)
    rows = []
    # Every warning of the training steps, whatever the filters say: a bf16 model must run
    # without torch's dtype-mismatch fallback (placed first in a launch: torch warns once).
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for step in range(steps - 1):
            r = engine.train_step(my_microbatches(cfg, dims, step))
            vals = dp_mean(dims, [r.loss, *r.head_losses], 1 + n)
            rows.append({"loss": vals[0], "heads": vals[1:], "grad_norm": r.grad_norm})
    payload: dict = {
        "rows": rows,
        "plan": [plan.overlap_grad_reduce, plan.overlap_param_gather],
        "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "dtype_warnings": sorted({str(w.message) for w in seen if "dtype" in str(w.message)}),
    }
    if engine_name == "megatron":
        optimizers = getattr(engine.optimizer, "chained_optimizers", [engine.optimizer])
        main = {p.dtype for o in optimizers for g in o.optimizer.param_groups for p in g["params"]}
        payload["main_param_dtypes"] = sorted(map(str, main))
        payload["grad_buffers"] = [
            [str(b.param_dtype), str(b.grad_dtype)] for b in engine.ddp.buffers
        ]
    if engine_name == "megatron":
        engine.sync_params()
        payload["weights"] = full_state(model)
        payload["buckets"] = bucket_params(engine)
        events = trace_reductions(engine) if plan.overlap_grad_reduce else []
        r = engine.forward_backward(my_microbatches(cfg, dims, steps - 1))
        payload["events"] = events
        vals = dp_mean(dims, [r.loss, *r.head_losses], 1 + n)
        # A forward-backward without an optimizer step: no grad norm, so not a row.
        payload["last_forward"] = {"loss": vals[0], "heads": vals[1:]}
        payload["grads"] = reduced_grads(engine)
    else:
        r = engine.train_step(my_microbatches(cfg, dims, steps - 1))
        vals = dp_mean(dims, [r.loss, *r.head_losses], 1 + n)
        rows.append({"loss": vals[0], "heads": vals[1:], "grad_norm": r.grad_norm})
    if dims.rank == 0:
        torch.save(payload, os.path.join(out_dir, case["name"] + ".pt"))
    dist.barrier()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", required=True, help="JSON list of cases")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    for case in json.loads(args.cases):
        if case.get("kind") == "resume":
            run_resume_case(case, args.out)
        else:
            run_case(case, args.out)
    distributed.destroy()


if __name__ == "__main__":
    main()
