"""Metric sinks (console, metrics.jsonl, wandb, tensorboard), the console line, memory, and the
peak FLOP/s that MFU is measured against (the model's FLOPs per token are the model's own:
mtp_dist.model.model.flops_per_token)."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import psutil
import torch

from mtp_dist.config import Config
from mtp_dist.files import atomic_write

log = logging.getLogger(__name__)


GPU_PEAK_BF16 = (("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L40", 181e12))
"""Dense bf16 peak FLOP/s of GPUs by name (datasheets)."""


def default_peak_flops() -> tuple[float | None, str]:
    """(per-process peak FLOP/s, where it comes from) when logging.peak_flops is 0: a known
    GPU's datasheet; on a CPU the fp32 matmul rate this process reaches, measured once (so CPU
    MFU is the share of what this machine's matmuls can do); an unknown GPU has none, and MFU
    is then not shown rather than made up."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, peak in GPU_PEAK_BF16:
            if key in name:
                return peak, f"the dense bf16 peak of {key}"
        return None, f"unknown for {name}: set logging.peak_flops"
    return measure_matmul_flops(), "this process's measured fp32 matmul rate"


def measure_matmul_flops(n: int = 1024, repeats: int = 3) -> float:
    """The best of `repeats` timed n x n fp32 matmuls on the CPU, in FLOP/s (about 0.1 s)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up: thread pool, caches
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


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
        peak, source = cfg.logging.peak_flops, "logging.peak_flops"
        if not peak:
            peak, source = default_peak_flops()
        self.peak_flops_total = peak * world_size if peak else None
        """MFU's denominator (all processes), or None where the peak is unknown."""
        self.peak_source = source
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

    def mfu(self, model_flops_per_s: float) -> float | None:
        if self.peak_flops_total is None:
            return None
        return model_flops_per_s / self.peak_flops_total

    def describe_peak(self) -> str:
        if self.peak_flops_total is None:
            return f"MFU not shown: the peak FLOP/s is {self.peak_source}"
        return f"MFU against {self.peak_flops_total / 1e9:,.1f} GFLOP/s in all ({self.peak_source})"

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        step = record["step"]
        if step % self.cfg.logging.interval == 0 or step == self.cfg.train.steps:
            weights = record.get("head_loss_weights", self.cfg.model.loss_weights)
            log.info(console_line(record, self.cfg.train.steps, weights))
        flat = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        for key in ("head_losses", "head_accuracy", "eval_head_losses", "eval_head_accuracy",
                    "head_loss_weights"):  # fmt: skip
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


def console_line(r: dict, total_steps: int, loss_weights: list[float] | None = None) -> str:
    """One step's console line. `loss` is the training objective, the (weighted) sum of the
    heads' cross-entropies, so it says so: it is not any head's loss."""
    heads = " ".join(f"{x:.3f}" for x in r["head_losses"])
    n = len(r["head_losses"])
    weighted = loss_weights is not None and any(w != 1.0 for w in loss_weights)
    total = f"{'weighted sum' if weighted else 'sum'} of {n} head{'s' if n > 1 else ''}"
    line = (
        f"step {r['step']:>6}/{total_steps} | loss {r['loss']:.4f} ({total}) | heads {heads} | "
        f"lr {r['lr']:.2e} | gnorm {r['grad_norm']:.3f} | {r['tokens_per_s']:,.0f} tok/s | "
        f"mfu {_percent(r['mfu'])} | mem {r['memory_gib']:.2f} GiB | "
        f"eta {format_duration(r['eta_s'])}"
    )
    if r["skipped"]:
        line += " | SKIPPED (non-finite)"
    if "eval_loss" in r:
        losses = " ".join(f"{x:.3f}" for x in r["eval_head_losses"])
        acc = " ".join(f"{x:.3f}" for x in r["eval_head_accuracy"])
        line += (
            f"\n  validation: loss {r['eval_loss']:.4f} ({total}) | heads {losses} | "
            f"top-1 acc {acc}"
        )
    return line


def _percent(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def format_bytes(n: float) -> str:
    """A size in the largest binary unit that keeps it >= 1 (`512 B`, `37.5 MiB`, `1.2 GiB`):
    small sizes stay readable instead of rounding to 0.0 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            break
        n /= 1024
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
