"""The typed configuration: one dataclass tree, loaded strictly from YAML plus dotted overrides.

An unknown key, a wrong type or an inconsistent combination raises `ConfigError` with a message
that names the key and says how to fix it. Validation is pure: no I/O (the tokenizer, the data
and the engine's own requirements are checked by train.py before any compute), and nothing
here imports torch.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mtp_dist.errors import UserError
from mtp_dist.files import atomic_write


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the key and the fix."""


@dataclass
class ModelConfig:
    n_future_tokens: int = 1
    """n: number of heads; head i (1-based) predicts token t+i. n=1 is next-token prediction."""
    num_layers: int = 4
    """Transformer layers in the shared trunk (the heads add n more). To match parameters across
    n as the paper does, use num_layers = L - n for a reference depth of L layers."""
    hidden_size: int = 256
    num_attention_heads: int = 4
    num_query_groups: int | None = None
    """Grouped-query attention groups; None means multi-head attention."""
    ffn_hidden_size: int | None = None
    """SwiGLU inner size; None means 8/3 * hidden_size rounded up to a multiple of 64."""
    vocab_size: int = 32000
    """The tokenizer's vocabulary size; the embedding is padded to `vocab_multiple`."""
    vocab_multiple: int = 128
    """Padded vocabulary is a multiple of this (must also be divisible by parallel.tensor)."""
    seq_length: int = 512
    head_backward: Literal["sequential", "joint"] = "sequential"
    """sequential: heads run forward/backward one after another (one head's logits alive at a
    time, the paper's Figure 2); joint: all heads in one autograd graph."""
    head_loss_weights: list[float] | None = None
    """Weight of each head's cross-entropy in the summed loss; None means 1.0 each. With
    head_loss_weights_end: the weights at the first step."""
    head_loss_weights_end: list[float] | None = None
    """Optional: each head's weight at the end of the decay horizon (train.lr_decay_steps, or
    train.steps), reached linearly from head_loss_weights (e.g. DeepSeek-V3's 0.3 -> 0.1 for
    the extra heads); kept there after it. None: the weights stay as they start."""
    attention: Literal["sdpa", "megatron"] = "sdpa"
    """Core attention of every layer. sdpa: torch's scaled_dot_product_attention (fused
    flash / memory-efficient kernels, no s x s probabilities kept); megatron: megatron-core's
    own local attention (the reference; stores the softmax). No parameters either way: a
    checkpoint loads under both."""
    tie_embeddings: bool = False
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    init_std: float = 0.02
    init_scaled_output: bool = True
    """megatron-core's scaled init: the layers' output projections (attention proj, SwiGLU fc2)
    drawn with init_std / sqrt(2 x layers), every other matrix with init_std. false: every
    matrix with init_std (Hugging Face Llama's init; configs/induction.yaml uses it)."""
    init_from: str | None = None
    """Start from another model's weights instead of random ones (a new run: fresh optimizer,
    step 0): a Hugging Face Llama directory (`python -m mtp_dist.export ... --format hf`, or
    any Llama whose shapes match this config), an mtp-dist export (.pt) or checkpoint. Its
    layers become the trunk and head 1; heads 2..n come from its extra heads where it has them,
    else are copies of head 1. Ignored when the run resumes from its own checkpoint."""

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        return (8 * self.hidden_size // 3 + 63) // 64 * 64

    @property
    def loss_weights(self) -> list[float]:
        return self.head_loss_weights or [1.0] * self.n_future_tokens

    def loss_weights_at(self, progress: float) -> list[float]:
        """The heads' loss weights at `progress` in [0, 1] through the decay horizon: linear
        from head_loss_weights to head_loss_weights_end (the start when there is no end)."""
        start = self.loss_weights
        if self.head_loss_weights_end is None:
            return list(start)
        a = min(1.0, max(0.0, progress))
        return [
            w0 + a * (w1 - w0) for w0, w1 in zip(start, self.head_loss_weights_end, strict=True)
        ]


@dataclass
class ParallelConfig:
    tensor: int = 1
    """Tensor-parallel size (megatron-core column/row-parallel layers, vocab-parallel loss)."""
    pipeline: int = 1
    """Pipeline-parallel size; all heads and the unembedding are on the last stage."""
    pipeline_layers: Literal["auto", "even"] | list[int] = "auto"
    """The trunk's layers on each pipeline stage. auto: the split whose slowest stage has the
    fewest training FLOPs, the heads and unembeddings counted on the last stage
    (model/costs.py: balanced_split); even: the same number on every stage; or a list, one
    count >= 1 per stage, e.g. [10, 10, 10, 6]. Moot with pipeline=1."""


@dataclass
class TrainConfig:
    steps: int = 100
    micro_batch_size: int = 4
    global_batch_size: int = 8
    """Samples per optimizer step over all data-parallel ranks (gradient accumulation fills it)."""
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio (the paper: 0.1 language, 0.03 code)."""
    warmup_steps: int = 10
    lr_decay_steps: int | None = None
    """The cosine schedule's horizon: it reaches lr * min_lr_ratio at this step. None means
    train.steps. Recorded in checkpoints, so a resumed run can go on longer (a larger
    train.steps) on the same schedule."""
    trainable: Literal["all", "heads", "detached"] = "all"
    """What trains. all: every parameter. heads: heads 2..n only; the embedding, the trunk,
    head 1, the final norm and the unembedding are frozen (the trunk runs forward only, the
    frozen parameters get no gradients and no optimizer state): extra heads for an existing
    model (model.init_from) that keep its next-token output exactly. detached: everything
    trains, but heads 2..n's losses stop at the trunk's output, so the trunk learns from
    next-token prediction alone. Recorded in checkpoints; a resume must keep it."""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 1234
    resume: str = "auto"
    """auto: continue from the latest checkpoint in checkpoint.dir if any; none; or a path."""
    recompute: bool = False
    """Activation recomputation of the trunk's layers (full, per layer)."""
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 on GPU, fp32 on CPU."""
    max_bad_steps: int = 5
    """Consecutive non-finite steps tolerated (each is skipped) before the run stops."""
    eval_interval: int = 0
    """Evaluate every N steps (0: never)."""
    eval_steps: int = 2
    watchdog_seconds: float = 1800.0
    """A rank that makes no progress (no step, no evaluation, no checkpoint) for this long prints
    where every thread is and exits with status 4. 0 turns the watchdog off."""
    overlap_grad_reduce: bool | None = None
    """Reduce the data-parallel gradients in buckets while the backward still runs (megatron
    DDP's overlap_grad_reduce: the heads' bucket reduces during the trunk's backward of the
    last microbatch). engine=deepspeed: zero_optimization.overlap_comm, which overlaps the
    bucket reductions with each other only, since that engine reduces once after the last
    backward. null: on on GPU, off on CPU (same results there; the async path only costs)."""
    overlap_param_gather: bool | None = None
    """engine=megatron: all-gather the distributed optimizer's updated parameters during the
    next forward instead of at the end of the step; needs train.overlap_grad_reduce. null: on
    wherever train.overlap_grad_reduce is (megatron engine only)."""


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)
    """Shard directories (made by `python -m data_prep tokenize`)."""
    weights: list[float] | None = None
    """Blend weights, one per path; None means proportional to size."""
    split: str = "98,1,1"
    """train,valid,test proportions."""
    synthetic: bool = False
    """Megatron-core's mock dataset instead of shards: for smoke tests and benchmarks."""
    tokenizer: str | None = None
    """The tokenizer the shards were made with (a sentencepiece .model, or `byte`)."""
    cache_dir: str | None = None


@dataclass
class CheckpointConfig:
    dir: str | None = None
    """Defaults to RUN_DIR/checkpoints."""
    interval: int = 0
    """Save every N steps (0: only at the end and on SIGTERM/SIGUSR1)."""
    keep: int = 3
    """Keep the last K checkpoints."""
    overwrite: bool = False
    """Allow a run that does not resume from the directory's latest checkpoint to write into a
    directory that already holds checkpoints (it replaces them). Off: such a run is refused."""


@dataclass
class LoggingConfig:
    interval: int = 1
    wandb: bool = True
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "mtp-dist"
    tensorboard: bool = False
    peak_flops: float = 0.0
    """Peak FLOP/s of one device for the MFU estimate; 0 picks a default for the device."""


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1
    """ZeRO stage 1, 2 or 3 (checked by the engine: mtp_dist/engines/deepspeed)."""
    config: str | None = None
    """Optional DeepSpeed JSON; its batch sizes must agree with train.*."""


@dataclass
class RunConfig:
    dir: str = "runs/default"
    name: str | None = None


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    engine: str = "megatron"
    """A name in mtp_dist.engines.ENGINES: megatron or deepspeed."""

    def __post_init__(self):
        validate(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def dump(self, path: str | Path) -> None:
        atomic_write(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _positive(value: float | None, key: str, allow_zero: bool = False) -> None:
    """A finite number > 0 (>= 0 with allow_zero); None passes (it means "the default")."""
    if value is None:
        return
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    _need(ok, f"{key}={value} must be a finite number {'>= 0' if allow_zero else '> 0'}")


def _weights(values: list[float] | None, key: str) -> None:
    if values is None:
        return
    for i, w in enumerate(values):
        _positive(w, f"{key}[{i}]", allow_zero=True)
    _need(sum(values) > 0, f"{key} are all zero: at least one weight must be > 0")


def parse_split(split: str) -> list[float]:
    """data.split "train,valid,test" as three proportions (megatron-core's format)."""
    try:
        parts = [float(x) for x in split.split(",")]
    except ValueError:
        parts = []
    _need(
        len(parts) == 3 and all(math.isfinite(x) and x >= 0 for x in parts) and parts[0] > 0,
        f"data.split={split!r} must be three non-negative numbers train,valid,test with "
        "train > 0, e.g. 98,1,1",
    )
    return parts


def validate(c: Config) -> None:
    """Every field, and every combination, checked without I/O."""
    _validate_model(c.model, c.parallel)
    _validate_train(c.train)
    _validate_trainable(c)
    _need(
        c.model.init_from is None or c.train.resume in ("auto", "none"),
        f"model.init_from starts a new run from other weights, and train.resume={c.train.resume}"
        " continues a run from its checkpoint: set one of them (train.resume=auto still resumes "
        "a restarted run)",
    )
    d = c.data
    if not d.synthetic:
        _need(
            bool(d.paths) or c.train.steps == 0,
            "data.paths is empty: give shard directories (python -m data_prep tokenize) "
            "or set data.synthetic=true",
        )
    _need(all(d.paths), "data.paths has an empty entry: give shard directories")
    if d.weights is not None:
        _need(
            len(d.weights) == len(d.paths),
            "data.weights needs one weight per entry of data.paths",
        )
    _weights(d.weights, "data.weights")
    parse_split(d.split)
    if c.train.eval_interval:
        _need(
            parse_split(d.split)[1] > 0 or d.synthetic,
            f"train.eval_interval={c.train.eval_interval} but data.split={d.split!r} has no "
            "validation part: give it one (e.g. 98,1,1) or set train.eval_interval=0",
        )
    _validate_overlap(c)
    _need(c.checkpoint.interval >= 0, "checkpoint.interval must be >= 0 (0: only at the end)")
    _need(c.checkpoint.keep >= 1, "checkpoint.keep must be >= 1 (the last K are kept)")
    _need(c.logging.interval >= 1, "logging.interval must be >= 1 (print every N steps)")
    _positive(c.logging.peak_flops, "logging.peak_flops", allow_zero=True)
    _need(bool(c.run.dir), "run.dir must not be empty")


def _validate_model(m: ModelConfig, p: ParallelConfig) -> None:
    _need(m.n_future_tokens >= 1, "model.n_future_tokens must be >= 1 (1 is next-token only)")
    for key in (
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "vocab_size",
        "vocab_multiple",
        "seq_length",
    ):
        _need(getattr(m, key) >= 1, f"model.{key} must be >= 1")
    for key in ("num_query_groups", "ffn_hidden_size"):
        value = getattr(m, key)
        _need(value is None or value >= 1, f"model.{key} must be >= 1 (or null)")
    for key in ("rotary_base", "norm_epsilon", "init_std"):
        _positive(getattr(m, key), f"model.{key}")
    _need(p.tensor >= 1, "parallel.tensor must be >= 1")
    _need(p.pipeline >= 1, "parallel.pipeline must be >= 1")
    _validate_pipeline_layers(m, p)
    _need(
        m.hidden_size % m.num_attention_heads == 0,
        f"model.hidden_size={m.hidden_size} is not divisible by "
        f"model.num_attention_heads={m.num_attention_heads}",
    )
    groups = m.num_query_groups or m.num_attention_heads
    _need(
        m.num_attention_heads % groups == 0,
        "model.num_query_groups must divide model.num_attention_heads",
    )
    _need(
        groups % p.tensor == 0,
        f"parallel.tensor={p.tensor} must divide the attention heads / query groups ({groups})",
    )
    _need(
        m.ffn_size % p.tensor == 0,
        f"parallel.tensor={p.tensor} must divide the SwiGLU size {m.ffn_size} "
        "(model.ffn_hidden_size)",
    )
    _need(
        m.padded_vocab_size % p.tensor == 0,
        f"the padded vocabulary {m.padded_vocab_size} is not divisible by parallel.tensor="
        f"{p.tensor}: set model.vocab_multiple to a multiple of {p.tensor}",
    )
    # The schedule is linear from start to end: non-negative with a positive sum at both ends
    # means so at every step between.
    for key in ("head_loss_weights", "head_loss_weights_end"):
        weights = getattr(m, key)
        if weights is None:
            continue
        _need(
            len(weights) == m.n_future_tokens,
            f"model.{key} has {len(weights)} entries but model.n_future_tokens="
            f"{m.n_future_tokens}: give one weight per head",
        )
        _weights(weights, f"model.{key}")
    _need(
        m.init_from is None or bool(m.init_from.strip()),
        "model.init_from is empty: give a Hugging Face directory, an export or a checkpoint "
        "(or null for random weights)",
    )


def _validate_trainable(c: Config) -> None:
    t, m = c.train.trainable, c.model
    if t == "all":
        return
    _need(
        m.n_future_tokens >= 2,
        f"train.trainable={t} trains heads 2..n apart from the rest, but model.n_future_tokens="
        f"{m.n_future_tokens} has no extra heads: set model.n_future_tokens >= 2 (init_from "
        "adds them to an n=1 model as copies of head 1) or train.trainable=all",
    )
    if t != "heads":
        return
    _need(
        c.parallel.pipeline == 1,
        f"train.trainable=heads with parallel.pipeline={c.parallel.pipeline}: the stages "
        "before the last would have nothing to train; set parallel.pipeline=1 (tensor and "
        "data parallelism apply as usual)",
    )
    for key, weights in (
        ("model.head_loss_weights", m.head_loss_weights),
        ("model.head_loss_weights_end", m.head_loss_weights_end),
    ):
        _need(
            weights is None or sum(weights[1:]) > 0,
            f"{key}={weights} gives heads 2..n, the only ones train.trainable=heads trains, "
            "no weight: give at least one of them a weight > 0",
        )


def _validate_overlap(c: Config) -> None:
    """The explicit combinations; run_plan.resolve checks the ones the device's defaults make."""
    t = c.train
    if t.overlap_param_gather and c.engine != "megatron":
        raise ConfigError(
            f"train.overlap_param_gather=true needs megatron's distributed optimizer, but "
            f"engine={c.engine}: set engine=megatron or train.overlap_param_gather=false"
        )
    if t.overlap_param_gather and t.overlap_grad_reduce is False:
        raise ConfigError(
            "train.overlap_param_gather=true needs train.overlap_grad_reduce (megatron-core "
            "overlaps the parameter all-gather only with it): set train.overlap_grad_reduce=true "
            "or train.overlap_param_gather=false"
        )


def _validate_pipeline_layers(m: ModelConfig, p: ParallelConfig) -> None:
    layers = p.pipeline_layers
    _need(
        m.num_layers >= p.pipeline,
        f"model.num_layers={m.num_layers} is fewer than parallel.pipeline={p.pipeline}: every "
        "pipeline stage needs at least one trunk layer",
    )
    if layers == "even":
        _need(
            m.num_layers % p.pipeline == 0,
            f"model.num_layers={m.num_layers} is not divisible by parallel.pipeline="
            f"{p.pipeline}: set parallel.pipeline_layers=auto (or a list) for an uneven split",
        )
    elif isinstance(layers, list):
        _need(
            len(layers) == p.pipeline,
            f"parallel.pipeline_layers={layers} has {len(layers)} entries but parallel.pipeline="
            f"{p.pipeline}: give one layer count per stage (or auto)",
        )
        _need(
            all(k >= 1 for k in layers),
            f"parallel.pipeline_layers={layers} has a stage without trunk layers: every stage "
            "needs at least one",
        )
        _need(
            sum(layers) == m.num_layers,
            f"parallel.pipeline_layers={layers} places {sum(layers)} trunk layers but "
            f"model.num_layers={m.num_layers}: make the counts sum to it (or use auto)",
        )


def _validate_train(t: TrainConfig) -> None:
    _need(t.steps >= 0, "train.steps must be >= 0")
    _need(t.micro_batch_size >= 1, "train.micro_batch_size must be >= 1")
    _need(t.global_batch_size >= 1, "train.global_batch_size must be >= 1")
    _need(
        t.global_batch_size % t.micro_batch_size == 0,
        f"train.global_batch_size={t.global_batch_size} is not a multiple of "
        f"train.micro_batch_size={t.micro_batch_size}",
    )
    _positive(t.lr, "train.lr")
    _need(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio must be in [0, 1]")
    _need(t.warmup_steps >= 0, "train.warmup_steps must be >= 0")
    _need(
        t.lr_decay_steps is None or t.lr_decay_steps > t.warmup_steps,
        f"train.lr_decay_steps={t.lr_decay_steps} must be > train.warmup_steps="
        f"{t.warmup_steps} (or null: train.steps)",
    )
    _positive(t.weight_decay, "train.weight_decay", allow_zero=True)
    _positive(t.grad_clip, "train.grad_clip", allow_zero=True)
    for key in ("beta1", "beta2"):
        value = getattr(t, key)
        _need(0.0 <= value < 1.0, f"train.{key}={value} must be in [0, 1)")
    _need(t.seed >= 0, "train.seed must be >= 0")
    _need(bool(t.resume), "train.resume must be auto, none or a checkpoint path")
    _need(t.max_bad_steps >= 0, "train.max_bad_steps must be >= 0")
    _need(t.eval_interval >= 0, "train.eval_interval must be >= 0 (0: never)")
    _need(
        t.eval_steps >= 1 or not t.eval_interval,
        f"train.eval_steps={t.eval_steps} with train.eval_interval={t.eval_interval}: "
        "evaluate at least one batch, or set train.eval_interval=0",
    )
    _positive(t.watchdog_seconds, "train.watchdog_seconds", allow_zero=True)


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, recursing into dataclasses; ints and numeric
    strings widen to floats, nothing else is coerced."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__}")
        return _build(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key} cannot be null")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "1e-4" (no dot) as a string.
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool):
        if isinstance(value, bool) and tp is not bool:
            raise ConfigError(f"{key} must be {tp.__name__}, got a boolean")
        if not isinstance(value, tp):
            raise ConfigError(f"{key} must be {tp.__name__}, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp} for {key}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]}: valid keys here are {', '.join(sorted(names))}"
        )
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def apply_override(data: dict, override: str) -> None:
    """Apply one `a.b.c=value` override (value parsed as YAML) to a nested dict."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key=value, e.g. train.steps=10")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r} has an empty key part, e.g. train.steps=10")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
    node[parts[-1]] = _yaml(raw.encode(), f"override {override!r}") if raw != "" else None


def _yaml(data: bytes, what: str) -> Any:
    try:
        return yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} is not UTF-8 text ({e.reason}): give a YAML file") from e
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"{what} is not valid YAML{at}: {problem}; fix the syntax") from e


def from_dict(data: dict) -> Config:
    return _build(Config, data)


def load(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Load a YAML file (or the defaults) and apply dotted overrides; validates the result."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist: pass an existing --config path")
        data = _yaml(p.read_bytes(), f"config file {p}") or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
    for o in overrides:
        apply_override(data, o)
    return from_dict(data)
