"""The planner's result as one dict (the `--json` output) and as text."""

from __future__ import annotations

from mtp_dist.config import Config
from mtp_dist.model.costs import largest_module_parameters, parameter_breakdown
from mtp_dist.model.model import flops_per_token
from mtp_dist.plan import layouts
from mtp_dist.plan.memory import GiB, logits_bytes, model_states

ENGINE_STATES = (
    ("megatron (distributed optimizer)", "megatron", 1),
    ("deepspeed ZeRO-1", "deepspeed", 1),
    ("deepspeed ZeRO-2", "deepspeed", 2),
    ("deepspeed ZeRO-3", "deepspeed", 3),
)


def _gib(x: float) -> float:
    return round(x / GiB, 3)


def layout_json(p: layouts.LayoutPlan) -> dict:
    r = p.run
    return {
        "tensor": r.tp,
        "pipeline": r.pp,
        "data": r.dp,
        "micro_batch_size": r.micro_batch_size,
        "num_microbatches": r.num_microbatches,
        "recompute": p.cfg.train.recompute,
        "step_seconds": round(p.step_seconds, 3),
        "communication_seconds": {
            "tp_per_microbatch": round(p.communication.tp_per_slot, 5),
            "pp_per_microbatch": round(p.communication.pp_per_slot, 5),
            "dp_per_step": round(p.communication.dp_per_step, 4),
        },
        "bubble": round(p.bubble, 4),
        "tokens_per_day": round(p.tokens_per_day),
        "days": round(p.days, 2),
        "peak_gib": _gib(p.peak_bytes),
        "peak_stage": p.peak_stage,
        "memory": [
            {
                "stage": m.stage,
                "in_flight_microbatches": m.in_flight,
                "total_gib": _gib(m.total),
                "terms": [
                    {"name": t.name, "gib": _gib(t.bytes), "formula": t.formula} for t in m.terms
                ],
            }
            for m in p.memory
        ],
    }


def build(cfg: Config, hw: layouts.Hardware) -> dict:
    """Everything the command prints: parameters, the config's own layout on hw.gpus GPUs
    (memory term by term, model states under every engine; or why it cannot run there), and
    the ranked layouts, which are searched whether or not the config's own layout fits."""
    from mtp_dist.config import ConfigError
    from mtp_dist.model.costs import pipeline_split, stage_costs

    m = cfg.model
    try:
        run = layouts.check(cfg, hw.gpus)
    except ConfigError as e:
        run, own_refused = None, str(e)
    params = parameter_breakdown(m)
    stages = stage_costs(m, cfg.parallel.tensor, pipeline_split(m, cfg.parallel))
    params["per_stage"] = [
        {
            "stage": s.index,
            "trunk_layers": s.trunk_layers,
            "params": s.params,
            "params_per_rank": s.params_per_rank,
        }
        for s in stages
    ]
    feasible, refused = layouts.candidates(cfg, hw)
    result = {
        "gpus": hw.gpus,
        "hardware": {
            "gpus_per_node": hw.gpus_per_node,
            "gpu_memory_gib": hw.memory_gib,
            "gpu_tflops": hw.tflops,
            "mfu": hw.mfu,
            "intra_node_gbs": hw.intra_node_gbs,
            "inter_node_gbs": hw.inter_node_gbs,
        },
        "engine": cfg.engine
        if cfg.engine == "megatron"
        else f"deepspeed ZeRO-{cfg.deepspeed.zero_stage}",
        "params": params,
        "flops_per_token": flops_per_token(m),
        "layouts": [layout_json(p) for p in feasible],
        "refused": [{"layout": name, "reason": why} for name, why in refused],
    }
    if run is None:
        return result | {"layout": {"refused": own_refused}}
    return result | _own_layout(cfg, run, hw)


def _own_layout(cfg: Config, run, hw: layouts.Hardware) -> dict:
    m = cfg.model
    own = layouts.plan(cfg, run, hw)
    peak = own.stages[own.peak_stage]
    states = {}
    for name, engine, stage in ENGINE_STATES:
        terms = model_states(
            peak.params_per_rank,
            run.dp,
            engine,
            stage,
            run.dtype == "bf16",
            largest_module_parameters(m, run.tp),
        )
        states[name] = {t.name: {"gib": _gib(t.bytes), "formula": t.formula} for t in terms}
    bf16 = run.dtype == "bf16"
    return {
        "dtype": run.dtype,
        "tokens_per_step": run.tokens_per_step,
        "token_budget": cfg.train.steps * run.tokens_per_step,
        "layout": layout_json(own) | {"fits": layouts.fits(own, hw)},
        "model_states_peak_stage": {"stage": peak.index, "per_engine": states},
        "logits_gib": {
            "sequential_one_head": _gib(logits_bytes(m, run.tp, run.micro_batch_size, bf16, 1)),
            "joint_all_heads": _gib(
                logits_bytes(m, run.tp, run.micro_batch_size, bf16, m.n_future_tokens)
            ),
        },
    }


def text(r: dict, top: int) -> str:
    p = r["params"]
    lines = [
        f"Parameters (exact): total {p['total']:,}; embedding {p['embedding']:,}, "
        f"unembedding {p['unembedding']:,}, trunk {p['trunk']:,}, heads {p['heads']:,}",
    ]
    lay = r["layout"]
    if "refused" in lay:
        lines.append(f"  the config's own layout cannot run on {r['gpus']} GPUs: {lay['refused']}")
    else:
        lines.append(
            f"  at TP{lay['tensor']} x PP{lay['pipeline']} x DP{lay['data']} ({r['gpus']} GPUs):"
        )
    for s in p["per_stage"]:
        lines.append(
            f"    stage {s['stage']}: {s['trunk_layers']} trunk layers, {s['params']:,} "
            f"parameters, {s['params_per_rank']:,} per rank"
        )
    if "refused" not in lay:
        lines += _own_text(r, lay)
    hw = r["hardware"]
    lines.append("")
    lines.append(
        f"Layouts on {r['gpus']} GPUs ({hw['gpus_per_node']} per node), ranked by estimated step "
        f"time (MFU {hw['mfu']}, {hw['gpu_tflops']:g} TFLOP/s, 1F1B bubble, communication at "
        f"{hw['intra_node_gbs']:g} GB/s inside a node and {hw['inter_node_gbs']:g} GB/s between "
        f"nodes); {len(r['layouts'])} feasible, {len(r['refused'])} refused:"
    )
    lines.append(
        f"  {'TP':>3} {'PP':>3} {'DP':>4} {'mb':>3} {'rc':>3} {'step s':>8} {'bubble':>7} "
        f"{'TP ms/mb':>9} {'PP ms/mb':>9} {'DP s':>6} {'peak GiB':>9} {'Mtok/day':>9} {'days':>7}"
    )
    for x in r["layouts"][:top]:
        c = x["communication_seconds"]
        lines.append(
            f"  {x['tensor']:>3} {x['pipeline']:>3} {x['data']:>4} {x['micro_batch_size']:>3} "
            f"{'y' if x['recompute'] else 'n':>3} {x['step_seconds']:>8.2f} {x['bubble']:>7.1%} "
            f"{c['tp_per_microbatch'] * 1e3:>9.2f} {c['pp_per_microbatch'] * 1e3:>9.2f} "
            f"{c['dp_per_step']:>6.2f} {x['peak_gib']:>9.1f} {x['tokens_per_day'] / 1e6:>9,.0f} "
            f"{x['days']:>7.1f}"
        )
    if not r["layouts"]:
        lines.append("  none: " + (r["refused"][0]["reason"] if r["refused"] else ""))
    return "\n".join(lines)


def _own_text(r: dict, lay: dict) -> list[str]:
    lines = [
        f"Training FLOPs per token (heads included): {r['flops_per_token']:.4g}; "
        f"{r['tokens_per_step']:,} tokens per step, budget {r['token_budget'] / 1e9:,.1f}B tokens",
        "",
        f"Memory per rank, {r['engine']}, {r['dtype']}, micro batch {lay['micro_batch_size']}, "
        f"{lay['num_microbatches']} microbatches, recompute {lay['recompute']}:",
    ]
    for m in lay["memory"]:
        lines.append(
            f"  stage {m['stage']} ({m['in_flight_microbatches']} microbatches in flight): "
            f"{m['total_gib']:.2f} GiB"
        )
        for t in m["terms"]:
            lines.append(f"    {t['name']:<17} {t['gib']:9.2f} GiB   {t['formula']}")
    fit = "fits" if lay["fits"] else "does NOT fit"
    lines.append(
        f"  peak {lay['peak_gib']:.2f} GiB on stage {lay['peak_stage']}: {fit} "
        f"{r['hardware']['gpu_memory_gib']:g} GiB"
    )
    lines.append(f"  model states on stage {r['model_states_peak_stage']['stage']} by engine:")
    for name, terms in r["model_states_peak_stage"]["per_engine"].items():
        parts = ", ".join(f"{k} {v['gib']:.2f}" for k, v in terms.items())
        total = sum(v["gib"] for v in terms.values())
        lines.append(f"    {name:<34} {total:8.2f} GiB ({parts})")
    lg = r["logits_gib"]
    lines.append(
        f"  logits: one head (sequential) {lg['sequential_one_head']:.2f} GiB, all heads "
        f"(joint) {lg['joint_all_heads']:.2f} GiB"
    )
    return lines


def dry_run_text(layout: layouts.LayoutPlan, result: dict) -> str:
    lines = [f"dry run: {layout.describe()}, world {result['world']}"]
    for pos in result["positions"]:
        lines.append(
            f"  rank {pos['rank']:>5} (tp {pos['tp_rank']}, pp {pos['pp_rank']}): "
            f"{pos['params']:,} parameters, {pos['sharded_tensors']} sharded tensors"
        )
    lines.append(
        f"  sharded state dicts tile all {result['keys']} sharded keys exactly once; "
        f"{result['total_params']:,} parameters = the planner's; built in "
        f"{result['seconds']:.1f} s"
    )
    z = result.get("zero3")
    if z:
        lines.append(
            f"  ZeRO-3 over {z['dp']} data-parallel ranks: {z['partition_numel_max']:,} "
            f"elements per rank on the largest stage ({z['padding_max']:,} padding)"
        )
    return "\n".join(lines)
