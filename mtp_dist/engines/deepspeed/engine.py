"""DeepSpeed engine: ZeRO-1/2/3 data parallelism over megatron-core's tensor-parallel layers.

DeepSpeed is configured with one microbatch of global/dp samples and no accumulation of its
own: the engine runs this rank's microbatches inside `coalesce_grad_reduction()` (gradients
stay local, one reduction at the end) and steps once. The sequential heads run several
backward passes per microbatch (inside forward), which ZeRO-2/3's per-parameter reduce hooks
reject ("already reduced") unless reduction is deferred like this. Each microbatch's loss is
divided by their number and the heads get that factor as loss_scale. With pipeline
parallelism (ZeRO-1) megatron-core's schedule drives the microbatches through the DeepSpeed
engine in the same block.

With ZeRO-3 the model is built partitioned (`deepspeed.zero.Init`) and its initial weights are
written one gathered parameter at a time: no rank ever holds the whole model.

Checkpoints are DeepSpeed's own (bit-exact resume at the same layout); see checkpoint.py for
universal checkpoints (another data-parallel size) and the export.
"""

from __future__ import annotations

import contextlib
import os
from functools import partial

import torch
from megatron.core import parallel_state
from torch import Tensor

from mtp_dist.compat import deepspeed as fixes
from mtp_dist.config import Config, ConfigError
from mtp_dist.distributed import ParallelDims
from mtp_dist.engines.base import TrainStepResult
from mtp_dist.engines.deepspeed import checkpoint
from mtp_dist.engines.deepspeed.ds_config import MegatronMPU, build_ds_config, runtime_config
from mtp_dist.engines.optim import WarmupCosine, param_groups, unshare_adam_steps
from mtp_dist.model import weights
from mtp_dist.model.model import MTPModel
from mtp_dist.run_plan import RunPlan
from mtp_dist.schedule import StepResult, batch_to, microbatch_stats, run_schedule


def _import_deepspeed(dims: ParallelDims):
    if dims.device.type != "cuda":
        from mtp_dist.compat import cpu

        cpu.apply_deepspeed()
    import deepspeed

    return deepspeed


@contextlib.contextmanager
def _partitioned_in(init, dtype: torch.dtype):
    """`init` (a zero.Init) with torch's default dtype set to the parameters' (DeepSpeed's:
    build_ds_config keeps them equal). megatron-core creates its parameters in params_dtype
    except torch.nn.RMSNorm's gains, which take the default; deepspeed.initialize would cast
    those, but not for a model built under zero.Init, and ZeRO-3 needs one dtype per
    parameter group. Only parameters are built without an explicit dtype (inv_freq is
    float32 by name), so the model ends as the unpartitioned path leaves it."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with init:
            yield
    finally:
        torch.set_default_dtype(default)


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
    @classmethod
    def check_config(cls, cfg: Config, plan: RunPlan) -> None:
        stage, pp = cfg.deepspeed.zero_stage, cfg.parallel.pipeline
        if stage not in (1, 2, 3):
            raise ConfigError(
                f"deepspeed.zero_stage={stage} is not supported by engine=deepspeed: use 1, 2 "
                "or 3 (ZeRO-0 is refused because the sequential heads and the pipeline "
                "schedule run backward outside engine.backward(), which DeepSpeed allows with "
                "ZeRO-1/2/3 only)"
            )
        if pp > 1 and stage > 1:
            raise ConfigError(
                f"deepspeed.zero_stage={stage} with parallel.pipeline={pp}: DeepSpeed supports "
                "pipelines with ZeRO-1 only; use deepspeed.zero_stage=1 or parallel.pipeline=1"
            )
        if pp > 1 and cfg.model.tie_embeddings:
            raise ConfigError(
                "model.tie_embeddings with parallel.pipeline>1 is not supported by engine="
                "deepspeed; untie the embeddings or use engine=megatron"
            )
        ds = build_ds_config(cfg, plan, on_gpu=False)
        if fixes.selects_bf16_optimizer(ds):
            accum = ds["data_types"]["grad_accum_dtype"]
            raise ConfigError(
                f"deepspeed.config {cfg.deepspeed.config}: data_types.grad_accum_dtype={accum} "
                "with bf16 and deepspeed.zero_stage=1 makes DeepSpeed use its BF16_Optimizer, "
                "which cannot defer the gradient reduction this engine needs "
                "(coalesce_grad_reduction); use deepspeed.zero_stage=2 (without a pipeline) or "
                "accumulate in bf16 (remove data_types.grad_accum_dtype)"
            )

    @classmethod
    def model_construction(cls, cfg: Config, plan: RunPlan, dims: ParallelDims):
        """ZeRO-3: deepspeed.zero.Init partitions each parameter over the data-parallel group as
        soon as its module is built (megatron-core first fills it, TP-local: one module at a
        time, never the whole model)."""
        if cfg.deepspeed.zero_stage < 3:
            return contextlib.nullcontext()
        deepspeed = _import_deepspeed(dims)
        from deepspeed.accelerator import get_accelerator

        # zero.Init reads the data-parallel size through deepspeed.comm; uninitialised, it
        # sees 1 and rejects the batch sizes. Wraps the existing process group.
        deepspeed.init_distributed(
            dist_backend=get_accelerator().communication_backend_name(), dist_init_required=False
        )
        # Only the device is overridden: Init's dtype override would also make the float32
        # tensors built meanwhile (the rotary inv_freq) bf16.
        init = deepspeed.zero.Init(
            data_parallel_group=parallel_state.get_data_parallel_group(),
            config_dict_or_path=runtime_config(cfg, plan, dims),
            mpu=MegatronMPU(),
            tensor_overrides=[deepspeed.zero.DeepSpeedTensorOverride.device],
        )
        return _partitioned_in(init, plan.torch_dtype)

    @classmethod
    def init_weights(cls, cfg: Config, dims: ParallelDims, model: MTPModel, source=None) -> None:
        """ZeRO-3: one parameter at a time is gathered, written by one data-parallel rank (in
        turn, so the ranks share the drawing) and scattered back: the peak is one full
        parameter. The values are weights.init_parameter's, as without partitioning."""
        if cfg.deepspeed.zero_stage < 3:
            weights.init_weights(model, cfg.train.seed, source)
            return
        deepspeed = _import_deepspeed(dims)
        for i, (name, p) in enumerate(model.named_parameters()):
            writer = i % dims.dp
            with deepspeed.zero.GatheredParameters([p], modifier_rank=writer):
                if dims.dp_rank == writer:
                    weights.init_parameter(model, name, cfg.train.seed, source)

    def __init__(self, cfg: Config, plan: RunPlan, dims: ParallelDims, model: MTPModel):
        deepspeed = _import_deepspeed(dims)
        self.cfg = cfg
        self.dims = dims
        self.model = model
        self.num_microbatches = plan.num_microbatches
        t = cfg.train
        ds_config = runtime_config(cfg, plan, dims)
        if t.recompute:
            fixes.checkpoint_layers(model.trunk)
        model.config.grad_scale_func = None
        groups = param_groups(model, t.weight_decay, fixes.full_shape)
        scheduler = partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=WarmupCosine.of(t))
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

    def _forward(self, batch: dict[str, Tensor], loss_scale: float = 1.0):
        batch = batch_to(batch, self.dims.device)
        return self.ds(batch["tokens"], loss_mask=batch.get("loss_mask"), loss_scale=loss_scale)

    def _run(self, microbatches: list[dict[str, Tensor]], forward_only: bool) -> StepResult:
        """All microbatches of this rank through the engine: megatron-core's schedule with a
        pipeline, else one forward (and backward) per microbatch."""
        if self.dims.pp > 1:
            view = _ScheduleView(self.ds, self.model)
            return run_schedule(view, microbatches, self.cfg.model.seq_length, forward_only)
        if forward_only:
            with torch.no_grad():
                return StepResult.mean([microbatch_stats(self._forward(b)) for b in microbatches])
        scale = 1.0 / len(microbatches)
        stats = []
        for batch in microbatches:
            out = self._forward(batch, loss_scale=scale)
            self.ds.backward(out.loss * scale)
            stats.append(microbatch_stats(out))
        return StepResult.mean(stats)

    def train_step(self, microbatches: list[dict[str, Tensor]]) -> TrainStepResult:
        if len(microbatches) != self.num_microbatches:
            raise ValueError(
                f"got {len(microbatches)} microbatches; the plan has {self.num_microbatches}"
            )
        self.ds.train()
        lr = self.lr
        with self.ds.coalesce_grad_reduction():
            result = self._run(microbatches, forward_only=False)
        self.ds.step()
        applied = self.ds.was_step_applied()
        if not applied:
            # DeepSpeed holds the schedule on a skipped step; the trainer's step count and the
            # data do not stop, so step k must still run at the schedule's value for k.
            self.ds.lr_scheduler.step()
        norm = self.ds.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        return TrainStepResult.of(result, norm, skipped=not applied, lr=lr)

    def eval_step(self, microbatches: list[dict[str, Tensor]]) -> StepResult:
        self.ds.eval()
        try:
            return self._run(microbatches, forward_only=True)
        finally:
            self.ds.train()

    def full_parameters(self):
        """Context in which this rank's parameters hold their (TP-local) values: ZeRO-3
        partitions them over data-parallel ranks, so weights.full_state(model) must run inside
        it (collective; read-only)."""
        if self.cfg.deepspeed.zero_stage < 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.model.parameters()))

    def save(self, directory: str) -> None:
        # DeepSpeed writes its recovery scripts next to the tag folder: keep them inside too.
        self.ds.save_checkpoint(directory, tag=checkpoint.TAG, save_latest=False)

    def load(self, directory: str, load_optimizer: bool = True) -> None:
        if not os.path.isdir(os.path.join(directory, checkpoint.TAG)):
            raise FileNotFoundError(
                f"{directory} holds no DeepSpeed checkpoint ({checkpoint.TAG}/ is missing): was "
                "it saved with engine=deepspeed?"
            )
        universal = checkpoint.is_universal(directory)
        fixes.set_universal_load(self.ds, universal)
        path, _ = self.ds.load_checkpoint(
            directory,
            tag=checkpoint.TAG,
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
        decays = [g["weight_decay"] for g in param_groups(self.model, self.cfg.train.weight_decay)]
        if len(inner.param_groups) != len(decays):
            raise RuntimeError(f"expected {len(decays)} param groups after the universal load")
        for group, decay in zip(inner.param_groups, decays, strict=True):
            group["weight_decay"] = decay
        unshare_adam_steps(inner)

    @staticmethod
    def load_full_weights(directory: str | os.PathLike, model: MTPModel) -> None:
        checkpoint.load_model_weights(model, directory)
