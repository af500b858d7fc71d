"""Layouts for a GPU count: each TP x PP x DP x micro-batch (x recompute) layout the config, the
run plan and the engine accept, its per-rank memory, and its estimated step time.

Step time (1F1B): (m + p - 1) microbatch slots of the slowest stage, where a stage's slot is its
training FLOPs for one microbatch (heads and their unembeddings on the last stage, one more
trunk forward with recompute) over t GPUs at the assumed MFU of their peak. Communication is not
modelled beyond what the MFU absorbs.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtp_dist.config import Config, ConfigError, from_dict
from mtp_dist.model.costs import (
    StageCost,
    largest_module_parameters,
    pipeline_split,
    stage_costs,
)
from mtp_dist.model.spec import layer_flops_per_token
from mtp_dist.plan.memory import GiB, StageMemory, stage_memory
from mtp_dist.run_plan import RunPlan, resolve

MICRO_BATCHES = (1, 2, 4, 8)


@dataclass(frozen=True)
class Hardware:
    gpus: int
    gpus_per_node: int = 8
    memory_gib: float = 80.0
    tflops: float = 989.0
    """Dense bf16 peak TFLOP/s of one GPU (H100 SXM: 989)."""
    mfu: float = 0.4
    """Assumed share of the peak a stage's matmuls reach (bubble and recompute come on top)."""


@dataclass(frozen=True)
class LayoutPlan:
    cfg: Config
    """The config with this layout."""
    run: RunPlan
    stages: list[StageCost]
    memory: list[StageMemory]
    step_seconds: float
    bubble: float
    """Share of the step the pipeline's fill and drain take: (p - 1) / (m + p - 1)."""
    tokens_per_day: float
    days: float
    """Days for the config's token budget (train.steps x tokens per step)."""

    @property
    def peak_bytes(self) -> float:
        return max(m.total for m in self.memory)

    @property
    def peak_stage(self) -> int:
        return max(self.memory, key=lambda m: m.total).stage

    def describe(self) -> str:
        r = self.run
        recompute = ", recompute" if self.cfg.train.recompute else ""
        return f"TP{r.tp} x PP{r.pp} x DP{r.dp}, micro batch {r.micro_batch_size}{recompute}"


def with_layout(
    cfg: Config, tensor: int, pipeline: int, micro_batch: int, recompute: bool
) -> Config:
    """cfg at another layout, validated (ConfigError names what the layout breaks)."""
    data = cfg.to_dict()
    data["parallel"].update(tensor=tensor, pipeline=pipeline)
    data["train"].update(micro_batch_size=micro_batch, recompute=recompute)
    return from_dict(data)


def check(cfg: Config, world: int) -> RunPlan:
    """What a training would refuse at this world size before any compute: the run plan's and
    the engine's checks (ConfigError)."""
    from mtp_dist import engines

    run = resolve(cfg, world, on_gpu=True)
    engines.check_config(cfg, run)
    return run


def plan(cfg: Config, run: RunPlan, hw: Hardware) -> LayoutPlan:
    """Memory and step time of cfg's layout (already checked: `check`)."""
    m = cfg.model
    bf16 = run.dtype == "bf16"
    stages = stage_costs(m, run.tp, pipeline_split(m, cfg.parallel))
    largest = largest_module_parameters(m, run.tp)
    memory = [
        stage_memory(
            m,
            stage=s.index,
            pipeline=run.pp,
            trunk_layers=s.trunk_layers,
            params=s.params_per_rank,
            tensor=run.tp,
            dp=run.dp,
            micro_batch=run.micro_batch_size,
            num_microbatches=run.num_microbatches,
            recompute=cfg.train.recompute,
            bf16=bf16,
            engine=cfg.engine,
            zero_stage=cfg.deepspeed.zero_stage,
            largest_layer=largest,
            last=s.last,
        )
        for s in stages
    ]
    tokens_per_microbatch = run.micro_batch_size * m.seq_length
    rate = run.tp * hw.tflops * 1e12 * hw.mfu
    recompute = layer_flops_per_token(m) / 3 if cfg.train.recompute else 0.0
    slot = max(
        (s.flops_per_token + s.trunk_layers * recompute) * tokens_per_microbatch / rate
        for s in stages
    )
    slots = run.num_microbatches + run.pp - 1
    step = slots * slot
    tokens_per_day = run.tokens_per_step * 86400 / step
    return LayoutPlan(
        cfg=cfg,
        run=run,
        stages=stages,
        memory=memory,
        step_seconds=step,
        bubble=(run.pp - 1) / slots,
        tokens_per_day=tokens_per_day,
        days=cfg.train.steps * run.tokens_per_step / tokens_per_day,
    )


def fits(p: LayoutPlan, hw: Hardware) -> bool:
    return p.peak_bytes <= hw.memory_gib * GiB


def memory_refusal(p: LayoutPlan, hw: Hardware) -> str:
    return (
        f"{p.describe()}: planned peak {p.peak_bytes / GiB:.1f} GiB per rank on pipeline stage "
        f"{p.peak_stage} exceeds the GPU's {hw.memory_gib:g} GiB (--gpu-memory): set "
        "train.recompute=true, raise parallel.tensor or parallel.pipeline, or lower "
        "train.micro_batch_size"
    )


def candidates(cfg: Config, hw: Hardware) -> tuple[list[LayoutPlan], list[tuple[str, str]]]:
    """Every layout of hw.gpus GPUs (TP within a node): the feasible ones ranked by step time
    (then model parallelism, then memory), and the refused ones with the reason."""
    feasible, refused = [], []
    tps = [t for t in (1, 2, 4, 8, 16) if t <= hw.gpus_per_node and hw.gpus % t == 0]
    for tp in tps:
        for pp in (p for p in range(1, hw.gpus // tp + 1) if hw.gpus % (tp * p) == 0):
            for mb in MICRO_BATCHES:
                for recompute in (False, True):
                    name = f"TP{tp} x PP{pp}, micro batch {mb}" + (
                        ", recompute" if recompute else ""
                    )
                    try:
                        layout_cfg = with_layout(cfg, tp, pp, mb, recompute)
                        run = check(layout_cfg, hw.gpus)
                    except ConfigError as e:
                        refused.append((name, str(e)))
                        continue
                    p = plan(layout_cfg, run, hw)
                    if fits(p, hw):
                        feasible.append(p)
                    else:
                        refused.append((name, memory_refusal(p, hw)))
    # Equal estimates go to the least model parallelism: its communication, which the estimate
    # leaves out, only grows with it.
    feasible.sort(key=lambda p: (round(p.step_seconds, 6), p.run.tp * p.run.pp, p.peak_bytes))
    return feasible, refused
