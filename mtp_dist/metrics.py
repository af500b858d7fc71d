"""Metric sinks (console, metrics.jsonl, wandb, tensorboard) and the FLOPs/MFU estimate."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import psutil
import torch

from mtp_dist.config import Config

# The trainer reads the model's FLOPs per token from here.
from mtp_dist.model.model import flops_per_token  # noqa: F401


def default_peak_flops() -> float:
    """Per-device peak FLOP/s when logging.peak_flops is 0: dense bf16 of known GPUs, and a
    nominal 1e11 for a CPU (so CPU MFU numbers are only indicative)."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, peak in (("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L40", 181e12)):
            if key in name:
                return peak
        return 100e12
    return 1e11


def memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return psutil.Process().memory_info().rss / 2**30


class Metrics:
    """Writes on the main rank only; every sink is optional and none is required."""

    def __init__(self, cfg: Config, run_dir: Path, is_main: bool, resume_id: str | None = None):
        self.is_main = is_main
        self.jsonl = None
        self.wandb = None
        self.tb = None
        if not is_main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        if cfg.logging.wandb and cfg.logging.wandb_mode != "disabled":
            try:
                import wandb

                os.environ.setdefault("WANDB_SILENT", "true")
                self.wandb = wandb.init(
                    project=cfg.logging.wandb_project,
                    name=cfg.run.name,
                    dir=str(run_dir),
                    mode=cfg.logging.wandb_mode,
                    config=cfg.to_dict(),
                    id=resume_id,
                    resume="allow",
                )
            except Exception as e:  # a missing or broken wandb never stops training
                print(f"wandb disabled: {e}", file=sys.stderr)
        if cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError as e:
                print(f"tensorboard disabled: {e}", file=sys.stderr)

    @property
    def wandb_id(self) -> str | None:
        return self.wandb.id if self.wandb is not None else None

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        flat = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        for key in ("head_losses", "head_accuracy", "eval_head_losses", "eval_head_accuracy"):
            for i, v in enumerate(record.get(key) or []):
                flat[f"{key}/{i + 1}"] = v
        if self.wandb is not None:
            self.wandb.log(flat, step=record["step"])
        if self.tb is not None:
            for k, v in flat.items():
                self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()
