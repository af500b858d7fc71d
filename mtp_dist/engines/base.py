"""The small interface the trainer needs from an engine; nothing else knows which one runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from mtp_dist.model.model import MTPModel
from mtp_dist.pipeline import StepResult


@dataclass
class TrainStepResult:
    result: StepResult
    """Losses of this step (the last stage's view; NaN elsewhere until the trainer reduces)."""
    grad_norm: float
    """Global gradient norm before clipping (NaN if unknown on this rank)."""
    skipped: bool
    """True when the loss or gradients were not finite: no update was applied."""
    lr: float


class Engine(Protocol):
    model: MTPModel
    """This pipeline stage's unwrapped model."""

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
