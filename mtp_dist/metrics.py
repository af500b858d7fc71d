"""Metric sinks (console, metrics.jsonl, wandb, tensorboard), the console line, memory, and the
peak FLOP/s that MFU is measured against (the model's FLOPs per token are the model's own:
mtp_dist.model.model.flops_per_token)."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import psutil
import torch

from mtp_dist.config import Config
from mtp_dist.files import atomic_write

log = logging.getLogger(__name__)


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


WANDB_ID = "wandb-id"
"""The run directory remembers its wandb run, so that a resumed run logs into the same one."""


class Metrics:
    """Every step's record to the console (every logging.interval steps), metrics.jsonl, wandb
    and tensorboard. Writes on the main rank only; every sink but the file is optional, and a
    missing or broken one never stops training."""

    def __init__(self, cfg: Config, run_dir: Path, is_main: bool, world_size: int):
        self.cfg = cfg
        self.is_main = is_main
        self.peak_flops_total = (cfg.logging.peak_flops or default_peak_flops()) * world_size
        self.jsonl = None
        self.wandb = None
        self.tb = None
        if not is_main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        if cfg.logging.wandb and cfg.logging.wandb_mode != "disabled":
            self.wandb = _start_wandb(cfg, run_dir)
        if cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError as e:
                log.warning(f"tensorboard disabled: {e}")

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        step = record["step"]
        if step % self.cfg.logging.interval == 0 or step == self.cfg.train.steps:
            log.info(console_line(record, self.cfg.train.steps))
        flat = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        for key in ("head_losses", "head_accuracy", "eval_head_losses", "eval_head_accuracy"):
            for i, v in enumerate(record.get(key) or []):
                flat[f"{key}/{i + 1}"] = v
        if self.wandb is not None:
            self.wandb.log(flat, step=step)
        if self.tb is not None:
            for k, v in flat.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()


def _start_wandb(cfg: Config, run_dir: Path):
    id_file = run_dir / WANDB_ID
    try:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        run = wandb.init(
            project=cfg.logging.wandb_project,
            name=cfg.run.name,
            dir=str(run_dir),
            mode=cfg.logging.wandb_mode,
            config=cfg.to_dict(),
            id=id_file.read_text().strip() if id_file.is_file() else None,
            resume="allow",
        )
        atomic_write(id_file, run.id + "\n")
        return run
    except Exception as e:  # a missing or broken wandb never stops training
        log.warning(f"wandb disabled: {e}")
        return None


def console_line(r: dict, total_steps: int) -> str:
    heads = " ".join(f"{x:.3f}" for x in r["head_losses"])
    line = (
        f"step {r['step']:>6}/{total_steps} | loss {r['loss']:.4f} | heads {heads} | "
        f"lr {r['lr']:.2e} | gnorm {r['grad_norm']:.3f} | {r['tokens_per_s']:,.0f} tok/s | "
        f"mfu {100 * r['mfu']:.2f}% | mem {r['memory_gib']:.2f} GiB | "
        f"eta {format_duration(r['eta_s'])}"
    )
    if r["skipped"]:
        line += " | SKIPPED (non-finite)"
    if "eval_loss" in r:
        acc = " ".join(f"{x:.3f}" for x in r["eval_head_accuracy"])
        line += f"\n  eval loss {r['eval_loss']:.4f} | head top-1 acc {acc}"
    return line


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
