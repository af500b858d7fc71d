"""DeepSpeed engine: ZeRO-1/2/3 data parallelism over megatron-core's tensor-parallel layers.

DeepSpeed is configured with one microbatch of global/dp samples and no accumulation of its
own: the engine runs this rank's microbatches inside `coalesce_grad_reduction()` (gradients
stay local, one reduction at the end) and steps once. The sequential heads run several
backward passes per microbatch (inside forward), which ZeRO-2/3's per-parameter reduce hooks
reject ("already reduced") unless reduction is deferred like this. Each microbatch's loss is
divided by their number and the heads get that factor as loss_scale. With pipeline
parallelism (ZeRO-0/1) megatron-core's schedule drives the microbatches through the DeepSpeed
engine in the same block.

Checkpoints are DeepSpeed's own (bit-exact resume at the same layout); `to_universal` converts
one into a universal checkpoint that loads at another data-parallel size.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor

from mtp_dist.config import Config
from mtp_dist.distributed import ParallelDims
from mtp_dist.engines.base import TrainStepResult
from mtp_dist.model.model import MTPModel
from mtp_dist.pipeline import StepResult, run_schedule

TAG = "deepspeed"
"""save(directory) puts DeepSpeed's tag folder directory/TAG, so every file stays inside."""

# (key in the DeepSpeed JSON, key in train.*) that must agree.
_BATCH_KEYS = (
    ("train_micro_batch_size_per_gpu", "train.micro_batch_size"),
    ("train_batch_size", "train.global_batch_size"),
    ("gradient_accumulation_steps", "train.global_batch_size / (micro_batch_size * dp)"),
)


class WarmupCosine:
    """Learning-rate factor (for LambdaLR) of the megatron engine's schedule: linear warm-up
    over `warmup` steps, then cosine decay to `min_ratio` at `decay` steps, constant after.
    Optimizer step k (1-based) runs at the schedule's value for k, as in the megatron engine
    (LambdaLR passes k-1). A class rather than a closure so LambdaLR's state_dict can save it."""

    def __init__(self, warmup: int, decay: int, min_ratio: float):
        self.warmup, self.decay, self.min_ratio = warmup, decay, min_ratio

    def __call__(self, step: int) -> float:
        step += 1
        if self.warmup > 0 and step <= self.warmup:
            return step / self.warmup
        if step > self.decay:
            return self.min_ratio
        ratio = (step - self.warmup) / max(1, self.decay - self.warmup)
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return self.min_ratio + coeff * (1.0 - self.min_ratio)


class MegatronMPU:
    """The `mpu` DeepSpeed asks for, from megatron-core's parallel_state.

    model-parallel = tensor x pipeline (the gradient norm is summed over it, and checkpoint
    files are named by its rank); tensor-parallel = the shards that
    `p.tensor_model_parallel` marks (replicated parameters count once in the norm)."""

    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(
        parallel_state.get_tensor_model_parallel_world_size
    )
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(parallel_state.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(
        parallel_state.get_pipeline_model_parallel_world_size
    )
    get_data_parallel_rank = staticmethod(parallel_state.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(parallel_state.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(parallel_state.get_data_parallel_group)
    get_model_parallel_group = staticmethod(parallel_state.get_model_parallel_group)

    @staticmethod
    def get_model_parallel_rank() -> int:
        return dist.get_rank(group=parallel_state.get_model_parallel_group())

    @staticmethod
    def get_model_parallel_world_size() -> int:
        return dist.get_world_size(group=parallel_state.get_model_parallel_group())


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: norms' gains (and any biases) are not decayed."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim == 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_ds_config(cfg: Config, dp: int, on_gpu: bool) -> dict:
    """DeepSpeed's config dict: cfg.deepspeed.config (if given) completed from cfg.train; a
    contradiction between the two is a ValueError naming both keys."""
    t = cfg.train
    gas = t.global_batch_size // (t.micro_batch_size * dp)
    ds: dict = {}
    path = cfg.deepspeed.config
    if path is not None:
        try:
            with open(path) as f:
                ds = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"deepspeed.config={path!r} cannot be read as JSON: {e}") from e
        wanted = (t.micro_batch_size, t.global_batch_size, gas)
        for (ds_key, cfg_key), value in zip(_BATCH_KEYS, wanted, strict=True):
            if ds_key in ds and ds[ds_key] != value:
                raise ValueError(
                    f"deepspeed.config {path}: {ds_key}={ds[ds_key]} contradicts {cfg_key}="
                    f"{value}; remove {ds_key} from the JSON or change {cfg_key}"
                )
        stage = ds.get("zero_optimization", {}).get("stage")
        if stage is not None and stage != cfg.deepspeed.zero_stage:
            raise ValueError(
                f"deepspeed.config {path}: zero_optimization.stage={stage} contradicts "
                f"deepspeed.zero_stage={cfg.deepspeed.zero_stage}; make them equal"
            )
    if ds.get("fp16", {}).get("enabled"):
        raise ValueError(
            f"deepspeed.config {path}: fp16 is not supported (the sequential heads would need "
            "the dynamic loss scale up front); use bf16"
        )
    bf16 = t.dtype == "bf16" or (t.dtype == "auto" and on_gpu)
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["gradient_accumulation_steps"] = gas
    ds["train_batch_size"] = t.global_batch_size
    ds.setdefault("gradient_clipping", t.grad_clip)
    ds.setdefault("zero_optimization", {})["stage"] = cfg.deepspeed.zero_stage
    ds.setdefault("bf16", {}).setdefault("enabled", bf16)
    # torch's AdamW as the client optimizer is "untested" in DeepSpeed's eyes.
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 2**31 - 1)
    if on_gpu and "optimizer" not in ds:
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": 1e-8},
        }
    return ds


def _apply_recompute(model: MTPModel) -> None:
    """Non-reentrant torch checkpointing of every trunk layer (instead of megatron-core's
    reentrant recompute, which DeepSpeed's ZeRO-3 hooks do not expect)."""
    model.config.recompute_granularity = None
    model.config.recompute_method = None
    model.config.recompute_num_layers = None
    for layer in model.trunk.layers:
        layer.forward = partial(
            torch.utils.checkpoint.checkpoint, layer.forward, use_reentrant=False
        )


class _ScheduleView:
    """What megatron-core's pipeline schedule expects of a model (config, model_type,
    set_input_tensor), calling through the DeepSpeed engine. The engine itself will not do: its
    own `config` attribute would shadow the model's."""

    def __init__(self, engine, model: MTPModel):
        self.engine = engine
        self.config = model.config
        self.model_type = model.model_type
        self.set_input_tensor = model.set_input_tensor

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def parameters(self):
        return self.engine.parameters()


class DeepSpeedEngine:
    def __init__(self, cfg: Config, dims: ParallelDims, model: MTPModel):
        on_gpu = dims.device.type == "cuda"
        if not on_gpu:
            from mtp_dist.compat import cpu

            cpu.apply_deepspeed()
        import deepspeed

        self.cfg = cfg
        self.dims = dims
        self.model = model
        t = cfg.train
        if cfg.deepspeed.zero_stage == 0:
            raise ValueError(
                "deepspeed.zero_stage=0 is not supported by engine=deepspeed: the sequential "
                "heads and the pipeline schedule run backward outside engine.backward(), which "
                "DeepSpeed allows with ZeRO-1/2/3 only; use deepspeed.zero_stage=1"
            )
        if dims.pp > 1 and cfg.deepspeed.zero_stage > 1:
            raise ValueError(
                f"deepspeed.zero_stage={cfg.deepspeed.zero_stage} with parallel.pipeline="
                f"{dims.pp}: DeepSpeed supports pipelines with ZeRO-1 only; "
                "use deepspeed.zero_stage=1"
            )
        if dims.pp > 1 and cfg.model.tie_embeddings:
            raise ValueError(
                "model.tie_embeddings with parallel.pipeline>1 is not supported by engine="
                "deepspeed; untie the embeddings or use engine=megatron"
            )
        ds_config = build_ds_config(cfg, dims.dp, on_gpu)
        self.num_microbatches = ds_config["gradient_accumulation_steps"]
        # The engine accumulates; DeepSpeed sees the rank's whole share as one microbatch.
        ds_config["train_micro_batch_size_per_gpu"] = t.global_batch_size // dims.dp
        ds_config["gradient_accumulation_steps"] = 1
        if t.recompute:
            _apply_recompute(model)
        model.config.grad_scale_func = None
        groups = param_groups(model, t.weight_decay)
        scheduler = partial(
            torch.optim.lr_scheduler.LambdaLR,
            lr_lambda=WarmupCosine(
                t.warmup_steps, max(t.steps, t.warmup_steps + 1), t.min_lr_ratio
            ),
        )
        if "optimizer" in ds_config:
            optimizer, params = None, groups
        else:
            optimizer = torch.optim.AdamW(
                groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, weight_decay=t.weight_decay
            )
            params = None
        self.ds, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            model_parameters=params,
            lr_scheduler=scheduler,
            config=ds_config,
            mpu=MegatronMPU(),
            dist_init_required=False,
        )

    @property
    def lr(self) -> float:
        return self.ds.optimizer.param_groups[0]["lr"]

    def _step_result(self, outputs: list) -> StepResult:
        loss = torch.stack([o.loss.detach().float() for o in outputs]).mean().item()
        heads = torch.stack([o.head_losses.float() for o in outputs]).mean(0).tolist()
        acc = None
        if outputs[0].head_accuracy is not None:
            acc = torch.stack([o.head_accuracy.float() for o in outputs]).mean(0).tolist()
        return StepResult(loss, heads, acc)

    def _forward(self, batch: dict[str, Tensor], loss_scale: float = 1.0):
        tokens = batch["tokens"].to(self.dims.device)
        mask = batch.get("loss_mask")
        if mask is not None:
            mask = mask.to(self.dims.device)
        return self.ds(tokens, loss_mask=mask, loss_scale=loss_scale)

    def train_step(self, microbatches: list[dict[str, Tensor]]) -> TrainStepResult:
        if len(microbatches) != self.num_microbatches:
            raise ValueError(
                f"got {len(microbatches)} microbatches; train.global_batch_size / "
                f"(micro_batch_size * dp) = {self.num_microbatches}"
            )
        self.ds.train()
        lr = self.lr
        scale = 1.0 / len(microbatches)
        with self.ds.coalesce_grad_reduction():
            if self.dims.pp > 1:
                view = _ScheduleView(self.ds, self.model)
                result = run_schedule(view, microbatches, self.cfg.model.seq_length)
            else:
                outputs = []
                for batch in microbatches:
                    out = self._forward(batch, loss_scale=scale)
                    self.ds.backward(out.loss * scale)
                    outputs.append(out)
                result = self._step_result(outputs)
        self.ds.step()
        skipped = not self.ds.was_step_applied()
        norm = self.ds.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        return TrainStepResult(result, norm, skipped or not math.isfinite(norm), lr)

    def full_parameters(self):
        """Context in which this rank's parameters hold their (TP-local) values: ZeRO-3
        partitions them over data-parallel ranks, so weights.full_state(model) must run inside
        it (collective; read-only)."""
        if self.cfg.deepspeed.zero_stage < 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.model.parameters()))

    def eval_step(self, microbatches: list[dict[str, Tensor]]) -> StepResult:
        self.ds.eval()
        try:
            if self.dims.pp > 1:
                view = _ScheduleView(self.ds, self.model)
                return run_schedule(
                    view, microbatches, self.cfg.model.seq_length, forward_only=True
                )
            with torch.no_grad():
                return self._step_result([self._forward(b) for b in microbatches])
        finally:
            self.ds.train()

    def save(self, directory: str) -> None:
        # DeepSpeed writes its recovery scripts next to the tag folder: keep them inside too.
        self.ds.save_checkpoint(directory, tag=TAG, save_latest=False)

    def load(self, directory: str, load_optimizer: bool = True) -> None:
        if not os.path.isdir(os.path.join(directory, TAG)):
            raise FileNotFoundError(
                f"{directory} holds no DeepSpeed checkpoint ({TAG}/ is missing): was it saved "
                "with engine=deepspeed?"
            )
        universal = is_universal(directory)
        self.ds._config.load_universal_checkpoint = universal
        path, _ = self.ds.load_checkpoint(
            directory,
            tag=TAG,
            load_optimizer_states=load_optimizer,
            load_lr_scheduler_states=load_optimizer,
            load_module_only=not load_optimizer,
        )
        if path is None:
            raise FileNotFoundError(f"DeepSpeed could not load the checkpoint in {directory}")
        if universal and load_optimizer:
            self._fix_universal_optimizer_state()

    def _fix_universal_optimizer_state(self) -> None:
        """A universal load (seen with ZeRO-3) gives every param group the first group's
        weight decay, and may leave one Adam step tensor shared by all groups (incremented
        once per group per step). Restore the groups' decay and give each its own count."""
        inner = self.ds.optimizer.optimizer
        decays = [self.cfg.train.weight_decay, 0.0]
        if len(inner.param_groups) != len(decays):
            raise RuntimeError(f"expected {len(decays)} param groups after the universal load")
        for group, decay in zip(inner.param_groups, decays, strict=True):
            group["weight_decay"] = decay
        for state in inner.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def is_universal(directory: str) -> bool:
    """A universal checkpoint keeps one folder per parameter under zero/."""
    return os.path.isdir(os.path.join(directory, TAG, "zero"))


def load_model_weights(model: MTPModel, engine_dir: str | os.PathLike) -> None:
    """Full fp32 weights of a checkpoint save() wrote, into a single-process (TP1 x PP1) model,
    without a process group beyond the caller's: for the consolidated export. ZeRO-1/2/3.
    Checkpoints saved with tensor or pipeline parallelism are refused (not converted)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from mtp_dist.model.weights import load_full

    source = os.path.join(engine_dir, TAG)
    files = sorted(f for f in os.listdir(source) if f.endswith("model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{engine_dir} holds no DeepSpeed checkpoint ({TAG}/)")
    if any("mp_rank_00" not in f for f in files):
        raise NotImplementedError(
            f"{engine_dir}: exporting a DeepSpeed checkpoint saved with parallel.tensor or "
            "parallel.pipeline > 1 is not supported; save it at TP1 x PP1 (any DP size) first"
        )
    state = get_fp32_state_dict_from_zero_checkpoint(str(engine_dir), tag=TAG)
    with torch.no_grad():
        load_full(model, {k: v for k, v in state.items() if v is not None})


def _without_empty_extra_state(source: str, staging: str) -> None:
    """Stage `source` for ds_to_universal: megatron-core's linear layers put `_extra_state:
    None` into the module state, which the converter tries to save as a tensor. The model-state
    files are rewritten without those entries; everything else is linked, not copied."""
    for name in os.listdir(source):
        src = os.path.join(source, name)
        if name.startswith("mp_rank_") and name.endswith("_model_states.pt"):
            state = torch.load(src, map_location="cpu", weights_only=False)
            module = state.get("module")
            if module is not None:
                state["module"] = type(module)((k, v) for k, v in module.items() if v is not None)
            torch.save(state, os.path.join(staging, name))
        else:
            os.symlink(os.path.abspath(src), os.path.join(staging, name))


def to_universal(checkpoint_dir: str, out_dir: str, workers: int = 1) -> None:
    """Convert the directory one save() wrote into a universal checkpoint (another directory
    that load() accepts at any data-parallel size). Stage 1/2 checkpoints lack some state the
    format needs; inject_missing_state adds it (ignored for stage 3)."""
    from deepspeed.checkpoint import ds_to_universal

    source = os.path.join(checkpoint_dir, TAG)
    if not os.path.isdir(source):
        raise FileNotFoundError(f"{checkpoint_dir} holds no DeepSpeed checkpoint ({TAG}/)")
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".staging-") as staging:
        _without_empty_extra_state(source, staging)
        args = argparse.Namespace(
            input_folder=staging,
            output_folder=os.path.join(out_dir, TAG),
            num_extract_workers=workers,
            num_merge_workers=workers,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,
        )
        ds_to_universal.main(args)


def convert_training_checkpoint(step_dir: str, out_dir: str, workers: int = 1) -> None:
    """A trainer checkpoint (meta.json + engine/) -> the same with a universal engine/, which
    train.resume accepts at another data-parallel size. Built under a temporary name, then
    renamed, so an interrupted conversion leaves nothing that looks complete."""
    out = os.path.abspath(out_dir)
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "engine"))
    to_universal(os.path.join(step_dir, "engine"), os.path.join(tmp, "engine"), workers)
    shutil.copy(os.path.join(step_dir, "meta.json"), os.path.join(tmp, "meta.json"))
    os.rename(tmp, out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m mtp_dist.engines.deepspeed", description="DeepSpeed checkpoint tools"
    )
    sub = ap.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("to-universal", help="convert a checkpoint to a universal checkpoint")
    conv.add_argument(
        "checkpoint_dir",
        help="a training checkpoint (step_* with meta.json), or the directory save() wrote",
    )
    conv.add_argument("out_dir", help="where the universal checkpoint goes")
    conv.add_argument("--workers", type=int, default=1, help="extract/merge processes")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.checkpoint_dir):
        ap.error(f"{args.checkpoint_dir} is not a directory")
    if os.path.isfile(os.path.join(args.checkpoint_dir, "meta.json")):
        convert_training_checkpoint(args.checkpoint_dir, args.out_dir, args.workers)
    else:
        to_universal(args.checkpoint_dir, args.out_dir, args.workers)
    print(f"universal checkpoint: {os.path.abspath(args.out_dir)}")


if __name__ == "__main__":
    main(sys.argv[1:])
