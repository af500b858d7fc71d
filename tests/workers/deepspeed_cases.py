"""Worker run under torchrun by tests/test_deepspeed.py.

Each case trains the tiny MTP model (configs/tiny.yaml, n=4) with the DeepSpeed engine at one
layout and ZeRO stage on the same deterministic global batches, optionally saving after a step
or starting from a saved checkpoint (a train.trainable=heads case reports what moved), and rank 0
writes the data-parallel mean loss, per-head
losses, grad norm, lr and skip flag of every step to OUT/<case name>.json. The first row says
what every rank held right after the model was built (engines.build_model, as train.py does)
and whether its initial weights equal those of a model built whole. Many cases per launch keep
the suite fast.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from mtp_dist.compat import ignore_known_warnings  # noqa: E402

ignore_known_warnings()

from mtp_dist import config as C  # noqa: E402
from mtp_dist import distributed, engines  # noqa: E402
from mtp_dist.compat import deepspeed as fixes  # noqa: E402
from mtp_dist.engines.deepspeed import checkpoint  # noqa: E402
from mtp_dist.engines.deepspeed.engine import DeepSpeedEngine  # noqa: E402
from mtp_dist.engines.optim import param_groups  # noqa: E402
from mtp_dist.model.costs import pipeline_split  # noqa: E402
from mtp_dist.model.model import build_model  # noqa: E402
from mtp_dist.model.weights import full_state, init_weights  # noqa: E402
from mtp_dist.run_plan import resolve  # noqa: E402

SEED = 3


def global_batch(cfg: C.Config, step: int) -> torch.Tensor:
    m, t = cfg.model, cfg.train
    gen = torch.Generator().manual_seed(1000 + step)
    shape = (t.global_batch_size, m.seq_length + m.n_future_tokens)
    return torch.randint(0, m.vocab_size, shape, generator=gen)


def my_microbatches(cfg: C.Config, dims, step: int) -> list[dict]:
    tokens = global_batch(cfg, step)
    per = cfg.train.global_batch_size // dims.dp
    mine = tokens[dims.dp_rank * per : (dims.dp_rank + 1) * per]
    return [{"tokens": x} for x in mine.split(cfg.train.micro_batch_size)]


def dp_mean(dims, values: list[float], size: int) -> list[float]:
    """Mean over data-parallel ranks of the last stage's `size` values, on every rank."""
    stats = torch.zeros(size, dtype=torch.float64)
    if dims.is_last_stage and dims.tp_rank == 0:
        stats = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(stats)
    return (stats / dims.dp).tolist()


def nan_grad_hook(grad: torch.Tensor) -> torch.Tensor:
    return torch.full_like(grad, float("nan"))


def held_elements(model) -> dict:
    """Parameter elements this rank holds: ZeRO-3's partition (ds_tensor) where a parameter is
    partitioned, else the parameter; against the parameters' own (TP-local) sizes."""
    params = list(model.parameters())
    return {
        "held": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params),
        "full": sum(getattr(p, "ds_numel", p.numel()) for p in params),
        "materialised": sum(p.numel() for p in params),
        "count": len(params),
    }


def whole_build(cfg: C.Config, plan, dims):
    """The model built whole and initialised by weights.init_weights, as before ZeRO-3 built
    it partitioned."""
    p = cfg.parallel
    split = pipeline_split(cfg.model, p)
    whole = build_model(
        cfg.model, p.tensor, p.pipeline, dims.pp_rank, dtype=plan.torch_dtype, split=split
    )
    init_weights(whole, SEED)
    return whole


def equals_whole_build(engine, model, whole) -> bool:
    """The engine-built model's initial weights equal the whole build's (on every rank; values
    compared in float32)."""
    expected = dict(whole.named_parameters())
    with engine.full_parameters():
        same = all(torch.equal(v.float(), expected[k].float()) for k, v in model.named_parameters())
    flag = torch.tensor([0.0 if same else 1.0])
    dist.all_reduce(flag)
    return flag.item() == 0


def group_sizes(model, shape_of=None) -> list[int]:
    """Parameters per AdamW group (decayed, not decayed)."""
    return [len(g["params"]) for g in param_groups(model, 0.1, shape_of)]


def frozen_report(engine, cfg: C.Config, plan, model, whole, save_dir: str) -> dict:
    """After a train.trainable=heads run (TP1) saved to save_dir: whether every frozen tensor
    still has its initial value (`whole`'s) and every trained one moved, in the live model and
    in the checkpoint's full weights (the export's reader); the Adam state's elements over the
    ranks against the trained and all parameters' (ZeRO pads its partitions a little)."""
    trained = {k for k, p in model.named_parameters() if p.requires_grad}
    with engine.full_parameters():
        live = full_state(model)
    exported = build_model(cfg.model, dtype=plan.torch_dtype)
    checkpoint.load_model_weights(exported, save_dir)
    saved, start = full_state(exported), full_state(whole)
    moved = lambda state: {k for k in state if not torch.equal(state[k].float(), start[k].float())}
    inner = engine.ds.optimizer.optimizer
    held = torch.tensor([float(sum(s["exp_avg"].numel() for s in inner.state.values()))])
    dist.all_reduce(held)
    size = lambda ps: sum(getattr(p, "ds_numel", p.numel()) for p in ps)
    return {
        "trained": sorted(trained),
        "moved_live": sorted(moved(live)),
        "moved_saved": sorted(moved(saved)),
        "saved_equals_live": all(torch.equal(saved[k].float(), live[k].float()) for k in live),
        "adam_elements": held.item(),
        "trained_elements": size(p for p in model.parameters() if p.requires_grad),
        "all_elements": size(model.parameters()),
    }


def run_case(case: dict, out_dir: str) -> None:
    overrides = [
        "engine=deepspeed",
        f"train.seed={SEED}",
        f"parallel.tensor={case.get('tp', 1)}",
        f"parallel.pipeline={case.get('pp', 1)}",
        f"deepspeed.zero_stage={case['stage']}",
        f"train.steps={case.get('steps', 4)}",
        f"train.recompute={str(case.get('recompute', False)).lower()}",
    ]
    cfg = C.load("configs/tiny.yaml", overrides + case.get("overrides", []))
    p = cfg.parallel
    dims = distributed.init(p.tensor, p.pipeline, seed=SEED)
    plan = resolve(cfg, dims.world_size, on_gpu=False)
    model = engines.build_model(cfg, plan, dims)
    held = [None] * dims.world_size
    dist.all_gather_object(held, held_elements(model))
    whole = whole_build(cfg, plan, dims)
    groups = {
        "engine": group_sizes(model, fixes.full_shape),  # as DeepSpeedEngine groups them
        "shape": group_sizes(model),
        "whole": group_sizes(whole),
    }
    engine = DeepSpeedEngine(cfg, plan, dims, model)
    first = {"construction": held, "init_equal": equals_whole_build(engine, model, whole)}
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    rows = [{**first, "groups": groups, "dtypes": dtypes}]
    n = cfg.model.n_future_tokens
    start = 0
    if case.get("load"):
        engine.load(case["load"])
        start = case["start"]
    for step in range(start, cfg.train.steps):
        hook = None
        if step == case.get("nan_at") and dims.rank == 0:
            hook = next(model.parameters()).register_hook(nan_grad_hook)
        before = None
        if step == case.get("nan_at"):
            with engine.full_parameters():
                before = full_state(model)
        r = engine.train_step(my_microbatches(cfg, dims, step))
        if hook is not None:
            hook.remove()
        vals = dp_mean(dims, [r.loss, *r.head_losses], 1 + n)
        row = {"step": step, "loss": vals[0], "heads": vals[1:], "grad_norm": r.grad_norm}
        row.update(lr=r.lr, skipped=r.skipped)
        if before is not None:
            with engine.full_parameters():
                after = full_state(model)
            if dims.rank == 0:
                row["unchanged"] = all(torch.equal(before[k], after[k]) for k in before)
        rows.append(row)
        if step + 1 == case.get("save_after"):
            engine.save(case["save"])
    if case.get("frozen"):
        rows.append({"frozen": frozen_report(engine, cfg, plan, model, whole, case["save"])})
    if case.get("eval"):
        ev = engine.eval_step(my_microbatches(cfg, dims, 99))
        vals = dp_mean(dims, [ev.loss, *ev.head_losses, *(ev.head_accuracy or [])], 1 + 2 * n)
        rows.append({"eval": vals})
    if dims.rank == 0:
        with open(os.path.join(out_dir, case["name"] + ".json"), "w") as f:
            json.dump(rows, f)
    dist.barrier()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", required=True, help="JSON list of cases")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    for case in json.loads(args.cases):
        if case.get("save"):
            os.makedirs(case["save"], exist_ok=True)
        run_case(case, args.out)
    distributed.destroy()


if __name__ == "__main__":
    main()
