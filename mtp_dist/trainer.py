"""The trainer: run -> train_step -> engine.train_step (the schedule's forward/backward, then the
optimizer), with evaluation, checkpoints (interval, end, SIGTERM/SIGUSR1), resume, and metrics.

It talks to the engine only through engines/base.py. Its own state (step, data position,
skipped steps) is `state_dict()`, saved in every checkpoint's meta.json and restored by
`load_state_dict()`; the engine saves and loads the rest.
"""

from __future__ import annotations

import itertools
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from mtp_dist import checkpointing as ckpt
from mtp_dist.config import Config
from mtp_dist.distributed import ParallelDims, collective_device
from mtp_dist.engines.optim import decay_steps
from mtp_dist.metrics import Metrics, memory_gib
from mtp_dist.model.costs import parameter_breakdown, pipeline_split
from mtp_dist.model.model import flops_per_token
from mtp_dist.run_plan import RunPlan

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps); the message says why."""


class Trainer:
    def __init__(
        self,
        cfg: Config,
        plan: RunPlan,
        dims: ParallelDims,
        engine,
        data,
        manager: ckpt.CheckpointManager,
        metrics: Metrics,
        provenance: dict,
        progress: Callable[[str], None] = lambda phase: None,
    ):
        self.cfg = cfg
        self.plan = plan
        self.dims = dims
        self.engine = engine
        self.train_data, self.valid_data = data
        self.manager = manager
        self.metrics = metrics
        self.provenance = provenance
        """What the checkpoints record of where the run came from: tokenizer_hash,
        data_fingerprint and the schedule's lr_decay_steps (checked on resume)."""
        self.progress = progress
        """Called at every milestone with what comes next (the watchdog's heartbeat)."""
        self.step = 0
        self.consumed_samples = 0
        self.skipped_steps = 0
        self.bad_steps_in_a_row = 0
        self.stop_signal: int | None = None
        self.resumed = False
        self.flops_per_token = flops_per_token(cfg.model, cfg.train.trainable)

    def state_dict(self) -> dict:
        """What the trainer itself needs to continue a run."""
        return {
            "step": self.step,
            "consumed_samples": self.consumed_samples,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.consumed_samples = state["consumed_samples"]
        self.skipped_steps = state.get("skipped_steps", 0)

    def _on_signal(self, signum, _frame) -> None:
        self.stop_signal = signum

    def _install_signal_handlers(self) -> None:
        # Ctrl-C like a scheduler's SIGTERM: finish the step, save, exit 0.
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _should_stop(self) -> bool:
        """All ranks agree whether any of them received a stop signal."""
        flag = torch.tensor([1.0 if self.stop_signal is not None else 0.0])
        flag = flag.to(collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    def _batches(self, dataset, consumed: int):
        from mtp_dist.data import microbatches

        it = microbatches(
            dataset,
            self.plan.micro_batch_size,
            self.plan.global_batch_size,
            self.dims.dp_rank,
            self.dims.dp,
            consumed,
            seed=self.cfg.train.seed,
        )
        while True:
            yield list(itertools.islice(it, self.plan.num_microbatches))

    def head_loss_weights(self, step: int) -> list[float]:
        """The heads' loss weights of optimizer step `step` (1-based): model.head_loss_weights
        at step 1, model.head_loss_weights_end at the decay horizon (the learning rate's, which
        checkpoints record) and after, linear between. A function of the step alone, so a
        resumed run goes on with exactly the weights it would have had."""
        horizon = decay_steps(self.cfg.train)
        return self.cfg.model.loss_weights_at((step - 1) / max(1, horizon - 1))

    def layout(self) -> dict:
        """The process layout a checkpoint records (with a pipeline, the trunk's split too)."""
        layout = {"tp": self.dims.tp, "pp": self.dims.pp, "dp": self.dims.dp}
        if self.dims.pp > 1:
            layout["pipeline_layers"] = list(pipeline_split(self.cfg.model, self.cfg.parallel))
        return layout

    def save(self) -> Path:
        self.progress(f"saving the checkpoint of step {self.step}")
        tmp = self.manager.begin(self.step, self.dims.is_main)
        meta = {
            **self.state_dict(),
            "layout": self.layout(),
            "world_size": self.dims.world_size,
            "engine": self.cfg.engine,
            "trainable": self.cfg.train.trainable,
            "head_loss_weights": self.head_loss_weights(max(1, self.step)),
            **self.provenance,
            "config": self.cfg.to_dict(),
        }
        try:
            self.engine.save(str(tmp / "engine"))
            ckpt.save_rng(tmp, self.dims.rank)
            final = self.manager.commit(tmp, self.step, meta, self.dims.is_main)
        except BaseException as e:
            try:
                ckpt.raise_if_disk_full(e, tmp, self._checkpoint_bytes())
            finally:
                self.manager.abort(tmp, self.dims.is_main)  # e.g. a full disk: nothing half-written
            raise
        log.info(f"saved checkpoint {final}")
        return final

    def _checkpoint_bytes(self) -> int:
        """Roughly what this rank's share of a checkpoint takes: fp32 weights, main weights and
        Adam's two moments (16 bytes a parameter), split over the ranks."""
        params = parameter_breakdown(self.cfg.model)["total"]
        return 16 * params // self.dims.world_size

    def resume(self, path: Path, meta: dict) -> None:
        """Continue from a checkpoint that preflight found compatible (its meta given)."""
        if meta.get("engine", self.cfg.engine) != self.cfg.engine:
            raise ckpt.CheckpointError(
                f"checkpoint {path} was written by engine={meta['engine']}: set engine to it"
            )
        try:
            self.engine.load(str(path / "engine"))
        except (*ckpt.load_errors(), OSError) as e:
            raise ckpt.CheckpointError(
                f"checkpoint {path} cannot be loaded ({ckpt.load_error(e)}): it is damaged or "
                "incomplete; resume from another step (train.resume=PATH)"
            ) from e
        self.load_state_dict(meta)
        self.resumed = True
        # Per-rank RNG streams only mean the same thing at the same layout.
        if not (meta.get("layout") == self.layout() and ckpt.load_rng(path, self.dims.rank)):
            log.info("note: RNG streams not restored (checkpoint saved at another layout)")
        log.info(f"resumed from {path} at step {self.step}")

    def _reduce_losses(self, loss: float, heads: list[float], extra: list[float] | None = None):
        """The DP mean of the last stage's losses, on every rank."""
        n = self.cfg.model.n_future_tokens
        width = 1 + n + (n if extra is not None else 0)
        buf = torch.zeros(width, dtype=torch.float64, device=collective_device())
        if self.dims.is_last_stage and self.dims.tp_rank == 0:
            buf[0] = loss
            buf[1 : 1 + n] = torch.tensor(heads, dtype=torch.float64, device=buf.device)
            if extra is not None:
                buf[1 + n :] = torch.tensor(extra, dtype=torch.float64, device=buf.device)
        dist.all_reduce(buf)
        buf /= self.dims.dp
        values = buf.tolist()
        return values[0], values[1 : 1 + n], (values[1 + n :] if extra is not None else None)

    def train_step(self, microbatches) -> dict:
        weights = self.head_loss_weights(self.step + 1)
        self.engine.model.set_head_loss_weights(weights)
        t0 = time.perf_counter()
        out = self.engine.train_step(microbatches)
        loss, heads, _ = self._reduce_losses(out.loss, out.head_losses)
        elapsed = time.perf_counter() - t0
        tokens_per_s = self.plan.tokens_per_step / elapsed
        return {
            "step": self.step + 1,
            "loss": loss,
            "head_losses": heads,
            "head_loss_weights": weights,
            "lr": out.lr,
            "grad_norm": out.grad_norm,
            "skipped": out.skipped,
            "tokens_per_s": tokens_per_s,
            "mfu": self.metrics.mfu(self.flops_per_token * tokens_per_s),
            "memory_gib": memory_gib(),
            "step_time_s": elapsed,
            "consumed_samples": self.consumed_samples + self.plan.global_batch_size,
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

    def run(self) -> int:
        self._install_signal_handlers()
        log.info(self.metrics.describe_peak())
        t = self.cfg.train
        batches = self._batches(self.train_data, self.consumed_samples)
        start_step, start_time = self.step, time.perf_counter()
        # A resumed run's state is already saved; a new one saves its end even at step 0 (a
        # run of train.steps=0 from model.init_from converts a model into a checkpoint).
        saved_at = start_step if self.resumed else None
        while self.step < t.steps:
            self.progress(f"step {self.step + 1} (data, forward, backward, optimizer)")
            record = self.train_step(next(batches))
            self.step += 1
            self.consumed_samples += self.plan.global_batch_size
            if record["skipped"]:
                self.skipped_steps += 1
                self.bad_steps_in_a_row += 1
            else:
                self.bad_steps_in_a_row = 0
            record["skipped_steps"] = self.skipped_steps
            if t.eval_interval and self.step % t.eval_interval == 0:
                self.progress(f"evaluation after step {self.step}")
                record.update(self.evaluate())
            done = self.step - start_step
            record["eta_s"] = (time.perf_counter() - start_time) / done * (t.steps - self.step)
            self.metrics.log(record)
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
                log.info(f"received {name} on some rank: saving and exiting")
                if saved_at != self.step:
                    self.save()
                return 0
        if saved_at != self.step:
            self.save()
        return 0
