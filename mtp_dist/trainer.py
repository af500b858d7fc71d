"""The trainer: run -> train_step -> engine.train_step (the schedule's forward/backward, then the
optimizer), with evaluation, checkpoints (interval, end, SIGTERM/SIGUSR1), resume, and metrics.

It talks to the engine only through engines/base.py.
"""

from __future__ import annotations

import itertools
import math
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mtp_dist import checkpointing as ckpt
from mtp_dist.config import Config
from mtp_dist.distributed import ParallelDims
from mtp_dist.metrics import Metrics, default_peak_flops, flops_per_token, memory_gib


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps); the message says why."""


class Trainer:
    def __init__(self, cfg: Config, dims: ParallelDims, engine, data, manager, tokenizer_hash):
        self.cfg = cfg
        self.dims = dims
        self.engine = engine
        self.train_data, self.valid_data = data
        self.manager: ckpt.CheckpointManager = manager
        self.tokenizer_hash = tokenizer_hash
        self.run_dir = Path(cfg.run.dir)
        self.step = 0
        self.consumed_samples = 0
        self.bad_steps_in_a_row = 0
        self.skipped_steps = 0
        self.stop_signal: int | None = None
        self.wandb_id: str | None = None
        self.num_microbatches = cfg.train.global_batch_size // (
            cfg.train.micro_batch_size * dims.dp
        )
        self.flops_per_token = flops_per_token(cfg.model)
        self.peak_flops = cfg.logging.peak_flops or default_peak_flops()

    # ---- signals -------------------------------------------------------------------------
    def _on_signal(self, signum, _frame) -> None:
        self.stop_signal = signum

    def _install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)

    def _should_stop(self) -> bool:
        """All ranks agree whether any of them received a stop signal."""
        flag = torch.tensor([1.0 if self.stop_signal is not None else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    # ---- data ----------------------------------------------------------------------------
    def _batches(self, dataset, consumed: int):
        from mtp_dist.data import microbatches

        t = self.cfg.train
        it = microbatches(
            dataset,
            t.micro_batch_size,
            t.global_batch_size,
            self.dims.dp_rank,
            self.dims.dp,
            consumed,
        )
        while True:
            yield list(itertools.islice(it, self.num_microbatches))

    # ---- checkpoints ---------------------------------------------------------------------
    def save(self) -> Path:
        tmp = self.manager.begin(self.step, self.dims.is_main)
        self.engine.save(str(tmp / "engine"))
        ckpt.save_rng(tmp, self.dims.rank)
        meta = {
            "step": self.step,
            "consumed_samples": self.consumed_samples,
            "skipped_steps": self.skipped_steps,
            "layout": {"tp": self.dims.tp, "pp": self.dims.pp, "dp": self.dims.dp},
            "world_size": self.dims.world_size,
            "engine": self.cfg.engine,
            "tokenizer_hash": self.tokenizer_hash,
            "wandb_id": self.wandb_id,
            "config": self.cfg.to_dict(),
        }
        final = self.manager.commit(tmp, self.step, meta, self.dims.is_main)
        self._print(f"saved checkpoint {final}")
        return final

    def resume(self, path: Path) -> None:
        meta = ckpt.read_meta(path)
        ckpt.check_compatible(meta, self.cfg.to_dict()["model"], self.tokenizer_hash, path)
        if meta.get("engine", self.cfg.engine) != self.cfg.engine:
            raise ckpt.CheckpointError(
                f"checkpoint {path} was written by engine={meta['engine']}: set engine to it"
            )
        try:
            self.engine.load(str(path / "engine"))
        except (RuntimeError, KeyError, ValueError, OSError) as e:
            raise ckpt.CheckpointError(f"checkpoint {path} cannot be loaded: {e}") from e
        self.step = meta["step"]
        self.consumed_samples = meta["consumed_samples"]
        self.skipped_steps = meta.get("skipped_steps", 0)
        self.wandb_id = meta.get("wandb_id")
        same_world = meta.get("world_size") == self.dims.world_size
        if not (same_world and ckpt.load_rng(path, self.dims.rank)):
            self._print("note: RNG streams not restored (checkpoint saved at another layout)")
        self._print(f"resumed from {path} at step {self.step}")

    def resume_path(self) -> Path | None:
        r = self.cfg.train.resume
        if r == "none":
            return None
        if r == "auto":
            return self.manager.latest()
        path = Path(r)
        if not (path / ckpt.META).is_file():
            raise ckpt.CheckpointError(
                f"train.resume={r} is not a checkpoint directory (no {ckpt.META}): "
                "give a step_* directory, auto or none"
            )
        return path

    # ---- steps ---------------------------------------------------------------------------
    def _reduce_losses(self, loss: float, heads: list[float], extra: list[float] | None = None):
        """The DP mean of the last stage's losses, on every rank."""
        n = self.cfg.model.n_future_tokens
        width = 1 + n + (n if extra is not None else 0)
        buf = torch.zeros(width, dtype=torch.float64)
        if self.dims.is_last_stage and self.dims.tp_rank == 0:
            buf[0] = loss
            buf[1 : 1 + n] = torch.tensor(heads, dtype=torch.float64)
            if extra is not None:
                buf[1 + n :] = torch.tensor(extra, dtype=torch.float64)
        dist.all_reduce(buf)
        buf /= self.dims.dp
        values = buf.tolist()
        return values[0], values[1 : 1 + n], (values[1 + n :] if extra is not None else None)

    def train_step(self, microbatches) -> dict:
        t0 = time.perf_counter()
        out = self.engine.train_step(microbatches)
        loss, heads, _ = self._reduce_losses(out.result.loss, out.result.head_losses)
        elapsed = time.perf_counter() - t0
        tokens = self.cfg.train.global_batch_size * self.cfg.model.seq_length
        tokens_per_s = tokens / elapsed
        return {
            "step": self.step + 1,
            "loss": loss,
            "head_losses": heads,
            "lr": out.lr,
            "grad_norm": out.grad_norm,
            "skipped": out.skipped,
            "tokens_per_s": tokens_per_s,
            "mfu": self.flops_per_token * tokens_per_s / (self.peak_flops * self.dims.world_size),
            "memory_gib": memory_gib(),
            "step_time_s": elapsed,
            "consumed_samples": self.consumed_samples + self.cfg.train.global_batch_size,
        }

    def evaluate(self) -> dict:
        if self.valid_data is None:
            return {}
        batches = self._batches(self.valid_data, 0)
        losses, heads, accs = [], [], []
        for _ in range(self.cfg.train.eval_steps):
            r = self.engine.eval_step(next(batches))
            loss, h, acc = self._reduce_losses(r.loss, r.head_losses, r.head_accuracy or [])
            losses.append(loss)
            heads.append(h)
            accs.append(acc)
        mean = lambda rows: [sum(col) / len(col) for col in zip(*rows, strict=True)]
        return {
            "eval_loss": sum(losses) / len(losses),
            "eval_head_losses": mean(heads),
            "eval_head_accuracy": mean(accs),
        }

    # ---- the loop ------------------------------------------------------------------------
    def run(self, metrics: Metrics) -> int:
        self._install_signal_handlers()
        t = self.cfg.train
        batches = self._batches(self.train_data, self.consumed_samples)
        start_step, start_time = self.step, time.perf_counter()
        saved_at = None
        while self.step < t.steps:
            record = self.train_step(next(batches))
            self.step += 1
            self.consumed_samples += t.global_batch_size
            if record["skipped"]:
                self.skipped_steps += 1
                self.bad_steps_in_a_row += 1
            else:
                self.bad_steps_in_a_row = 0
            record["skipped_steps"] = self.skipped_steps
            if t.eval_interval and self.step % t.eval_interval == 0:
                record.update(self.evaluate())
            done = self.step - start_step
            eta = (time.perf_counter() - start_time) / done * (t.steps - self.step)
            record["eta_s"] = eta
            metrics.log(record)
            if self.step % self.cfg.logging.interval == 0 or self.step == t.steps:
                self._print(self._console_line(record))
            if self.bad_steps_in_a_row > t.max_bad_steps:
                self.save()
                raise TrainingStopped(
                    f"{self.bad_steps_in_a_row} non-finite steps in a row (limit "
                    f"train.max_bad_steps={t.max_bad_steps}); saved the last good state at step "
                    f"{self.step}: lower train.lr or inspect the data near sample "
                    f"{self.consumed_samples}"
                )
            interval = self.cfg.checkpoint.interval
            if interval and self.step % interval == 0:
                self.save()
                saved_at = self.step
            if self._should_stop():
                name = signal.Signals(self.stop_signal).name if self.stop_signal else "a signal"
                self._print(f"received {name} on some rank: saving and exiting")
                if saved_at != self.step:
                    self.save()
                return 0
        if saved_at != self.step:
            self.save()
        return 0

    def _console_line(self, r: dict) -> str:
        heads = " ".join(f"{x:.3f}" for x in r["head_losses"])
        line = (
            f"step {r['step']:>6}/{self.cfg.train.steps} | loss {r['loss']:.4f} | heads {heads} | "
            f"lr {r['lr']:.2e} | gnorm {r['grad_norm']:.3f} | {r['tokens_per_s']:,.0f} tok/s | "
            f"mfu {100 * r['mfu']:.2f}% | mem {r['memory_gib']:.2f} GiB | "
            f"eta {_fmt_time(r['eta_s'])}"
        )
        if r["skipped"]:
            line += " | SKIPPED (non-finite)"
        if "eval_loss" in r:
            acc = " ".join(f"{x:.3f}" for x in r["eval_head_accuracy"])
            line += f"\n  eval loss {r['eval_loss']:.4f} | head top-1 acc {acc}"
        return line

    def _print(self, msg: str) -> None:
        if self.dims.is_main:
            print(msg, flush=True)


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
