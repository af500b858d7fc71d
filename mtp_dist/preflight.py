"""Everything a training run checks before any process group exists, identically on every rank
(so that a refusal ends all ranks instead of leaving some waiting for the others):

- the plan (layout fits the world, batch fits the layout) and the engine's own requirements;
- the data (paths exist, manifests complete, one tokenizer) and the tokenizer's identity: the
  configured one, else the one the shards were made with;
- the checkpoint directory: writable, not in use by another training (a lock, taken by rank 0
  and held for the run), and never silently overwritten;
- the resume point: found, compatible, not already finished, and continued on the same
  schedule horizon, seed, sequence length and data;
- else model.init_from, if given: a model of the configured shapes and tokenizer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from mtp_dist import checkpointing as ckpt
from mtp_dist import init_from
from mtp_dist.config import Config, ConfigError
from mtp_dist.engines.optim import decay_steps
from mtp_dist.files import DirectoryLock
from mtp_dist.run_plan import RunPlan, resolve
from mtp_dist.sources import ModelSource

SYNTHETIC = "synthetic"

# Fields a resumed run must keep: they decide the sample order, the schedule and what trains
# (the optimizer holds state for the trained parameters only).
CONTINUITY_KEYS = (
    ("train", "trainable"),
    ("model", "head_loss_weights"),
    ("model", "head_loss_weights_end"),
    ("train", "seed"),
    ("model", "seq_length"),
    ("data", "split"),
    ("data", "weights"),
    ("data", "synthetic"),
)


class AlreadyFinished(Exception):
    """The checkpoint to resume from is at or past train.steps: nothing to do."""


@dataclass
class Preflight:
    cfg: Config
    """The config to run: as given, with the schedule horizon filled in from a resumed run."""
    plan: RunPlan
    manager: ckpt.CheckpointManager
    resume: Path | None
    meta: dict | None
    tokenizer_hash: str | None
    data_fingerprint: str
    locks: list[DirectoryLock]
    init_from: ModelSource | None = None
    """The weights a new run starts from (model.init_from; None when the run resumes)."""


def preflight(cfg: Config, world_size: int, rank: int, on_gpu: bool) -> Preflight:
    from mtp_dist import engines
    from mtp_dist.data import configured_tokenizer_hash, data_identity

    plan = resolve(cfg, world_size, on_gpu)
    engines.check_config(cfg, plan)
    tokenizer_hash, fingerprint = None, SYNTHETIC
    if not cfg.data.synthetic:
        for path in cfg.data.paths:
            if not Path(path).exists():
                raise ConfigError(
                    f"data.paths entry {path} does not exist: run `python -m data_prep "
                    "tokenize` first or fix the path"
                )
        fingerprint, shards_tokenizer = data_identity(cfg.data.paths, cfg.model.vocab_size)
        configured = configured_tokenizer_hash(cfg.data.tokenizer, cfg.model.vocab_size)
        tokenizer_hash = configured or shards_tokenizer
    run_dir = Path(cfg.run.dir)
    manager = ckpt.CheckpointManager(
        cfg.checkpoint.dir or run_dir / "checkpoints", cfg.checkpoint.keep, cfg.checkpoint.overwrite
    )
    manager.check_writable()
    locks = []
    if rank == 0:
        for directory in dict.fromkeys([run_dir.resolve(), manager.root.resolve()]):
            locks.append(DirectoryLock(directory, "trainings").acquire())
    resume = manager.resume_path(cfg.train.resume)
    meta = None
    if resume is not None:
        meta = ckpt.read_meta(resume)
        ckpt.check_compatible(meta, cfg.to_dict()["model"], tokenizer_hash, resume)
        cfg = _continued(cfg, meta, resume, fingerprint)
        if meta["step"] >= cfg.train.steps:
            raise AlreadyFinished(
                f"{resume} is at step {meta['step']} and train.steps={cfg.train.steps}: the run "
                "is finished, nothing to do (raise train.steps to train on)"
            )
    manager.check_no_overwrite(resume, meta["step"] if meta else 0)
    source = None
    if resume is None and cfg.model.init_from is not None:
        source = init_from.inspect(cfg.model.init_from)
        init_from.check(source, cfg, tokenizer_hash)
    plan = resolve(cfg, world_size, on_gpu)
    return Preflight(cfg, plan, manager, resume, meta, tokenizer_hash, fingerprint, locks, source)


def _continued(cfg: Config, meta: dict, path: Path, fingerprint: str) -> Config:
    """cfg checked against the checkpoint's, with the saved schedule horizon when the config
    does not set one (so train.steps can grow and the schedule stays)."""
    saved = meta["config"]
    for section, key in CONTINUITY_KEYS:
        was = saved.get(section, {}).get(key, getattr(getattr(cfg, section), key))
        now = getattr(getattr(cfg, section), key)
        if was != now:
            raise ckpt.CheckpointError(
                f"{section}.{key}={now!r} but the checkpoint {path} was trained with {was!r}: a "
                f"resumed run must keep it (set {section}.{key}={was!r}), or start a new run"
            )
    saved_fp = meta.get("data_fingerprint")
    if saved_fp is not None and saved_fp != fingerprint:
        raise ckpt.CheckpointError(
            f"data.paths hold other shards than the checkpoint {path} was trained on (their "
            "content or order differs): resume with the same data, or start a new run"
        )
    saved_horizon = meta.get("lr_decay_steps") or decay_steps_of(saved)
    horizon = cfg.train.lr_decay_steps
    if horizon is not None and horizon != saved_horizon:
        raise ckpt.CheckpointError(
            f"train.lr_decay_steps={horizon} but the checkpoint {path} decays over "
            f"{saved_horizon} steps: keep train.lr_decay_steps={saved_horizon} (or leave it "
            "unset), or start a new run"
        )
    train = dataclasses.replace(cfg.train, lr_decay_steps=saved_horizon)
    return dataclasses.replace(cfg, train=train)


def decay_steps_of(saved_config: dict) -> int:
    """The horizon of a checkpoint that predates its recording: train.steps at the time."""
    from mtp_dist.config import TrainConfig

    t = saved_config.get("train", {})
    return decay_steps(TrainConfig(steps=t.get("steps", 0), warmup_steps=t.get("warmup_steps", 0)))
