"""`python -m mtp_dist.train --config FILE [dotted.key=value ...]`

Runs as one process or under torchrun / the deepspeed launcher / srun. Every problem that can be
seen before compute (config, world size, engine requirements, tokenizer, data, checkpoint
directory, checkpoint shape) is a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from mtp_dist import config as config_mod
from mtp_dist.errors import StdoutLogHandler, run_cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m mtp_dist.train",
        description="Pretrain a multi-token-prediction model (megatron-core or DeepSpeed).",
    )
    p.add_argument("--config", help="YAML config (configs/*.yaml); defaults apply without it")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    p.add_argument(
        "--check",
        action="store_true",
        help="only run the checks that come before any compute (config, layout, engine, data, "
        "tokenizer, checkpoint directory, resume point) for --world-size processes, and exit: "
        "what the launch scripts do once before they start the ranks",
    )
    p.add_argument("--world-size", type=int, default=1, help="with --check: processes in all")
    p.add_argument(
        "--check-config",
        action="store_true",
        help="only load and validate the config and overrides, and exit (no world, data or "
        "checkpoint checks): what slurm/pipeline.sh does before it submits the jobs that make "
        "the data",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    # Parsed inside run_cli: --help into a closed pipe ends as quietly as any output.
    return run_cli(lambda: _main(parse_args(argv)))


def _main(args) -> int:
    # The config first, before the seconds of importing torch and megatron-core.
    cfg = config_mod.load(args.config, args.overrides)
    if args.check_config:
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from mtp_dist.compat import ignore_known_warnings

    ignore_known_warnings()  # before megatron-core is imported
    from mtp_dist.trainer import TrainingStopped

    if args.check:
        return check(cfg, args.world_size)
    try:
        return run(cfg)
    except TrainingStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 3


def _log_to_stdout(is_main: bool) -> None:
    """mtp_dist's own messages (checkpoints, resume, the step line) on the main rank's stdout;
    libraries keep Python's default (warnings and errors only)."""
    logger = logging.getLogger("mtp_dist")
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    if not logger.handlers:
        handler = StdoutLogHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.propagate = False


def pipeline_line(cfg) -> str:
    """The trunk's split over the pipeline stages, and each stage's share of the FLOPs."""
    from mtp_dist.model.costs import pipeline_split, stage_costs

    split = pipeline_split(cfg.model, cfg.parallel)
    flops = [s.flops_per_token for s in stage_costs(cfg.model, cfg.parallel.tensor, split)]
    shares = ", ".join(f"{f / max(flops):.2f}" for f in flops)
    return (
        f"pipeline: trunk layers per stage {list(split)} (parallel.pipeline_layers="
        f"{cfg.parallel.pipeline_layers}); training FLOPs per stage relative to the slowest: "
        f"{shares} (heads and unembedding on the last stage)"
    )


def check(cfg, world_size: int) -> int:
    import torch

    from mtp_dist.preflight import AlreadyFinished, preflight

    if world_size < 1:
        raise config_mod.ConfigError(f"--world-size={world_size} must be >= 1")
    try:
        pre = preflight(cfg, world_size, rank=-1, on_gpu=torch.cuda.is_available())
    except AlreadyFinished as e:
        print(f"done: {e}")
        return 0
    start = f"resumes {pre.resume} at step {pre.meta['step']}" if pre.resume else "starts afresh"
    if pre.init_from is not None:
        start += f" from the weights of {pre.init_from.describe()}"
    print(
        f"ok: {world_size} processes as TP{pre.plan.tp} x PP{pre.plan.pp} x DP{pre.plan.dp}, "
        f"{pre.plan.num_microbatches} microbatches per step, {pre.plan.dtype}; the run {start}"
    )
    if pre.plan.pp > 1:
        print(pipeline_line(pre.cfg))
    return 0


def run(cfg) -> int:
    import torch

    from mtp_dist import distributed, engines, init_from
    from mtp_dist.data import build_datasets
    from mtp_dist.engines.optim import decay_steps
    from mtp_dist.metrics import Metrics
    from mtp_dist.preflight import AlreadyFinished, preflight
    from mtp_dist.trainer import Trainer
    from mtp_dist.watchdog import Watchdog

    launch = distributed.read_launch_env()
    try:
        pre = preflight(cfg, launch.world_size, launch.rank, on_gpu=torch.cuda.is_available())
    except AlreadyFinished as e:
        if launch.rank == 0:
            print(f"done: {e}", flush=True)
        return 0
    cfg, plan = pre.cfg, pre.plan
    run_dir = Path(cfg.run.dir)
    watchdog = Watchdog(cfg.train.watchdog_seconds, launch.rank).start()
    source = None
    if pre.init_from is not None:
        # Before the run's process group: a checkpoint is read in a group of this rank alone.
        watchdog.progress(f"reading {pre.init_from.describe()}")
        source = init_from.load(pre.init_from, cfg.model, cfg.train.seed)
    watchdog.progress(f"creating the process group (world size {launch.world_size})")
    dims = distributed.init(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.train.seed)
    _log_to_stdout(dims.is_main)
    if dims.pp > 1:
        logging.getLogger("mtp_dist.train").info(pipeline_line(cfg))
    try:
        watchdog.progress("building the model and the engine")
        if dims.is_main:
            cfg.dump(run_dir / "config.yaml")
        # The engine decides how parameters are created (ZeRO-3: partitioned as they are built).
        model = engines.build_model(cfg, plan, dims, source)
        del source  # the engine has copied what this rank holds
        engine = engines.build_engine(cfg, plan, dims, model)
        watchdog.progress("building the datasets")
        train_ds = valid_ds = None  # train.steps=0 (e.g. a model.init_from conversion) reads none
        if cfg.train.steps > 0:
            train_ds, valid_ds, _ = build_datasets(
                cfg.data.paths,
                cfg.data.weights,
                cfg.data.split,
                cfg.model.seq_length,
                cfg.model.n_future_tokens,
                cfg.train.seed,
                (plan.train_samples, plan.eval_samples, 0),
                cfg.model.vocab_size,
                pre.tokenizer_hash,
                synthetic=cfg.data.synthetic,
                cache_dir=cfg.data.cache_dir,
            )
        provenance = {
            "tokenizer_hash": pre.tokenizer_hash,
            "data_fingerprint": pre.data_fingerprint,
            "lr_decay_steps": decay_steps(cfg.train),
        }
        metrics = Metrics(cfg, run_dir, dims.is_main, dims.world_size)
        try:
            trainer = Trainer(
                cfg, plan, dims, engine, (train_ds, valid_ds), pre.manager, metrics, provenance,
                progress=watchdog.progress,
            )  # fmt: skip
            if pre.resume is not None:
                watchdog.progress(f"loading {pre.resume}")
                trainer.resume(pre.resume, pre.meta)
            code = trainer.run()
        finally:
            metrics.close()
        logging.getLogger("mtp_dist.train").info(
            f"run directory {run_dir.resolve()} | checkpoints {pre.manager.root.resolve()} | "
            f"metrics {(run_dir / 'metrics.jsonl').resolve()}"
        )
        return code
    finally:
        watchdog.progress("shutting down")
        distributed.destroy()
        watchdog.stop()
        for lock in pre.locks:
            lock.release()


if __name__ == "__main__":
    sys.exit(main())
