"""Layouts for a GPU count: each TP x PP x DP x micro-batch (x recompute) layout the config, the
run plan and the engine accept (tensor-parallel groups inside a node), its per-rank memory, and
its estimated step time.

Step time (1F1B): (m + p - 1) microbatch slots, then the data-parallel exchange:

- a slot is the slowest stage's compute plus its tensor-parallel all-reduces, plus the pipeline
  send between stages. Compute: the stage's training FLOPs for one microbatch (heads and their
  unembeddings on the last stage, one more trunk forward with recompute) over t GPUs at the
  assumed MFU of their peak. TP: 4 all-reduces of the activations (b s h) per layer and
  microbatch (2 forward, 2 backward; 2 more with recompute), each 2 (t-1)/t of them over the
  link. PP: the activations forward and their gradient back, once each per slot.
- DP: once per step, gradients reduce-scattered and parameters all-gathered over the
  data-parallel group, 2 (d-1)/d of the stage's parameters per rank (ZeRO-3 gathers the
  parameters again for every microbatch's forward and backward). Counted in full: an upper
  bound where the engine overlaps it with the backward.

Each collective runs at the bandwidth of its slowest link: inside a node (NVLink) or between
nodes, given per GPU (Hardware, --intra-node-gbs and --inter-node-gbs). Ranks are placed as
megatron-core does (tensor-parallel ranks adjacent, then data-parallel, then pipeline), nodes
filled in rank order.
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
    """Assumed share of the peak a stage's matmuls reach (bubble, recompute and communication
    come on top)."""
    intra_node_gbs: float = 300.0
    """GB/s a GPU's collectives reach inside a node (H100 NVLink: 450 GB/s each way, of which
    a ring's bus bandwidth reaches about 300-360)."""
    inter_node_gbs: float = 40.0
    """GB/s per GPU between nodes (one 400 Gb/s NIC per GPU: 50 GB/s, about 40 reached)."""

    def within_node(self, span: int) -> bool:
        """Whether every group of `span` consecutive ranks (aligned) lies inside one node."""
        return span <= self.gpus_per_node and self.gpus_per_node % span == 0

    def bandwidth(self, span: int) -> float:
        """Bytes/s of a collective over groups spanning `span` consecutive ranks."""
        return (self.intra_node_gbs if self.within_node(span) else self.inter_node_gbs) * 1e9


@dataclass(frozen=True)
class Communication:
    """Seconds of communication a layout's step spends (see the module's docstring)."""

    tp_per_slot: float
    """The slowest stage's tensor-parallel all-reduces for one microbatch."""
    pp_per_slot: float
    """The pipeline's send of activations and their gradients, for one microbatch."""
    dp_per_step: float
    """The data-parallel gradient reduce-scatter and parameter all-gather, once a step (with
    ZeRO-3's per-microbatch parameter gathers)."""


@dataclass(frozen=True)
class LayoutPlan:
    cfg: Config
    """The config with this layout."""
    run: RunPlan
    stages: list[StageCost]
    memory: list[StageMemory]
    step_seconds: float
    communication: Communication
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
    comm = communication(cfg, run, stages, hw)
    slot = comm.pp_per_slot + max(
        (s.flops_per_token + s.trunk_layers * recompute) * tokens_per_microbatch / rate
        + _tp_seconds(cfg, run, s, hw)
        for s in stages
    )
    slots = run.num_microbatches + run.pp - 1
    step = slots * slot + comm.dp_per_step
    tokens_per_day = run.tokens_per_step * 86400 / step
    return LayoutPlan(
        cfg=cfg,
        run=run,
        stages=stages,
        memory=memory,
        step_seconds=step,
        communication=comm,
        bubble=(run.pp - 1) / slots,
        tokens_per_day=tokens_per_day,
        days=cfg.train.steps * run.tokens_per_step / tokens_per_day,
    )


def _ring(n: int) -> float:
    """The share of the data each rank sends in a ring all-reduce over n ranks (reduce-scatter
    plus all-gather): 2 (n - 1) / n."""
    return 2 * (n - 1) / n


def _activation_bytes(cfg: Config, run: RunPlan) -> int:
    m = cfg.model
    return run.micro_batch_size * m.seq_length * m.hidden_size * (2 if run.dtype == "bf16" else 4)


def _tp_seconds(cfg: Config, run: RunPlan, stage: StageCost, hw: Hardware) -> float:
    """A stage's tensor-parallel all-reduces for one microbatch: its trunk layers and, on the
    last stage, the heads' layers."""
    if run.tp == 1:
        return 0.0
    layers = stage.trunk_layers + (cfg.model.n_future_tokens if stage.last else 0)
    per_layer = 4 + (2 if cfg.train.recompute else 0)
    return layers * per_layer * _ring(run.tp) * _activation_bytes(cfg, run) / hw.bandwidth(run.tp)


def communication(cfg: Config, run: RunPlan, stages: list[StageCost], hw: Hardware):
    """The layout's communication (Communication; the module's docstring says the model)."""
    act = _activation_bytes(cfg, run)
    # A pipeline's neighbours are tp x dp ranks apart: inside a node only if all stages are.
    pp = 2 * act / hw.bandwidth(run.tp * run.dp * run.pp) if run.pp > 1 else 0.0
    dp = 0.0
    if run.dp > 1:
        per_param = 2 if run.dtype == "bf16" else 4
        params = max(s.params_per_rank for s in stages)
        exchanges = 1.0  # reduce-scatter of gradients + all-gather of parameters: one ring
        if cfg.engine == "deepspeed" and cfg.deepspeed.zero_stage == 3:
            exchanges += run.num_microbatches  # parameters gathered for forward and backward
        span = run.tp * run.dp  # data-parallel ranks are tp apart
        dp = exchanges * _ring(run.dp) * params * per_param / hw.bandwidth(span)
    tp = max(_tp_seconds(cfg, run, s, hw) for s in stages)
    return Communication(tp, pp, dp)


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
    # A tensor-parallel group stays inside a node: its all-reduces at every layer would
    # otherwise cross the slowest link.
    tps = [t for t in (1, 2, 4, 8, 16) if hw.within_node(t) and hw.gpus % t == 0]
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
    # Equal estimates go to the least model parallelism.
    feasible.sort(key=lambda p: (round(p.step_seconds, 6), p.run.tp * p.run.pp, p.peak_bytes))
    return feasible, refused
