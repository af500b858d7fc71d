"""The interface the trainer, train.py and export.py need from an engine; nothing else knows
which engine runs. An engine owns its whole story: config checks, how the model is built and
initialised, train/eval steps, save/load, and reading full weights for the export."""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from mtp_dist.config import Config
from mtp_dist.distributed import ParallelDims
from mtp_dist.model.model import MTPModel
from mtp_dist.run_plan import RunPlan
from mtp_dist.schedule import StepResult


@dataclass
class TrainStepResult:
    loss: float
    """Mean over microbatches of the weighted head-loss sum (the last stage's view; NaN
    elsewhere until the trainer reduces)."""
    head_losses: list[float]
    grad_norm: float
    """Global gradient norm before clipping (NaN if unknown on this rank)."""
    skipped: bool
    """True when no update was applied (non-finite gradients). A non-finite grad_norm with
    an applied update is not a skipped step."""
    lr: float

    @classmethod
    def of(cls, result: StepResult, grad_norm: float, skipped: bool, lr: float):
        return cls(result.loss, result.head_losses, grad_norm, skipped, lr)


class Engine(Protocol):
    model: MTPModel
    """This pipeline stage's unwrapped model."""

    @classmethod
    def check_config(cls, cfg: Config, plan: RunPlan) -> None:
        """Raise ConfigError for a configuration this engine cannot run, before any process
        group or model exists."""

    @classmethod
    def model_construction(
        cls, cfg: Config, plan: RunPlan, dims: ParallelDims
    ) -> AbstractContextManager:
        """The context in which this rank's model is built (collective). An engine that
        partitions parameters over data-parallel ranks (DeepSpeed ZeRO-3) partitions each one
        as its module is built, so that no rank ever holds the whole model; others: a no-op."""

    @classmethod
    def init_weights(
        cls,
        cfg: Config,
        dims: ParallelDims,
        model: MTPModel,
        source: Mapping[str, Tensor] | None = None,
    ) -> None:
        """Write weights.init_parameter's values (the same full weights for the same seed at
        any layout, or the full tensors of `source`: model.init_from) into the parameters as
        model_construction left them (collective)."""

    def __init__(self, cfg: Config, plan: RunPlan, dims: ParallelDims, model: MTPModel): ...

    def train_step(self, microbatches: list[dict[str, Tensor]]) -> TrainStepResult:
        """Forward/backward of this rank's microbatches of one global batch, then the
        optimizer and learning-rate scheduler step (skipped if not finite)."""

    def eval_step(self, microbatches: list[dict[str, Tensor]]) -> StepResult:
        """Forward only; per-head losses and top-1 accuracy on the last stage."""

    def save(self, directory: str) -> None:
        """Write model, optimizer and scheduler state into `directory` (collective; the
        directory exists and is temporary: the trainer makes it visible atomically)."""

    def load(self, directory: str, load_optimizer: bool = True) -> None:
        """Restore what save() wrote, possibly at another TP/PP/DP layout (collective)."""

    @staticmethod
    def load_full_weights(directory: str | os.PathLike, model: MTPModel) -> None:
        """The weights save() wrote into `directory`, loaded into a single-process (TP1 x PP1)
        model: for the exports and model.init_from."""
