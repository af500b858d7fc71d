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
from mtp_dist.errors import run_cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m mtp_dist.train",
        description="Pretrain a multi-token-prediction model (megatron-core or DeepSpeed).",
    )
    p.add_argument("--config", help="YAML config (configs/*.yaml); defaults apply without it")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: _main(args))


def _main(args) -> int:
    # The config first, before the seconds of importing torch and megatron-core.
    cfg = config_mod.load(args.config, args.overrides)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from mtp_dist.compat import ignore_known_warnings
    from mtp_dist.trainer import TrainingStopped

    ignore_known_warnings()
    try:
        return run(cfg)
    except TrainingStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 3


def _check_data_paths(cfg) -> None:
    for path in [] if cfg.data.synthetic else cfg.data.paths:
        if not Path(path).exists():
            raise config_mod.ConfigError(
                f"data.paths entry {path} does not exist: run `python -m data_prep tokenize` "
                "first or fix the path"
            )


def _log_to_stdout(is_main: bool) -> None:
    """mtp_dist's own messages (checkpoints, resume, the step line) on the main rank's stdout;
    libraries keep Python's default (warnings and errors only)."""
    logger = logging.getLogger("mtp_dist")
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.propagate = False


def run(cfg) -> int:
    import torch

    from mtp_dist import distributed, engines, run_plan
    from mtp_dist.checkpointing import CheckpointManager
    from mtp_dist.data import build_datasets, configured_tokenizer_hash
    from mtp_dist.metrics import Metrics
    from mtp_dist.model.model import build_model
    from mtp_dist.model.weights import init_weights
    from mtp_dist.trainer import Trainer

    launch = distributed.read_launch_env()
    plan = run_plan.resolve(cfg, launch.world_size, on_gpu=torch.cuda.is_available())
    engines.check_config(cfg, plan)
    _check_data_paths(cfg)
    tok_hash = (
        None
        if cfg.data.synthetic
        else configured_tokenizer_hash(cfg.data.tokenizer, cfg.model.vocab_size)
    )
    run_dir = Path(cfg.run.dir)
    manager = CheckpointManager(cfg.checkpoint.dir or run_dir / "checkpoints", cfg.checkpoint.keep)
    manager.check_writable()

    dims = distributed.init(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.train.seed)
    _log_to_stdout(dims.is_main)
    try:
        if dims.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            cfg.dump(run_dir / "config.yaml")
        model = build_model(
            cfg.model,
            dims.tp,
            dims.pp,
            dims.pp_rank,
            dtype=plan.torch_dtype,
            device=dims.device,
            recompute=cfg.train.recompute,
        )
        init_weights(model, cfg.train.seed)
        engine = engines.build_engine(cfg, plan, dims, model)
        train_ds, valid_ds, _ = build_datasets(
            cfg.data.paths,
            cfg.data.weights,
            cfg.data.split,
            cfg.model.seq_length,
            cfg.model.n_future_tokens,
            cfg.train.seed,
            (plan.train_samples, plan.eval_samples, 0),
            cfg.model.vocab_size,
            tok_hash,
            synthetic=cfg.data.synthetic,
            cache_dir=cfg.data.cache_dir,
        )
        metrics = Metrics(cfg, run_dir, dims.is_main, dims.world_size)
        try:
            trainer = Trainer(
                cfg, plan, dims, engine, (train_ds, valid_ds), manager, metrics, tok_hash
            )
            resume = trainer.resume_path()
            if resume is not None:
                trainer.resume(resume)
            code = trainer.run()
        finally:
            metrics.close()
        logging.getLogger("mtp_dist.train").info(
            f"run directory {run_dir.resolve()} | checkpoints {manager.root.resolve()} | "
            f"metrics {(run_dir / 'metrics.jsonl').resolve()}"
        )
        return code
    finally:
        distributed.destroy()


if __name__ == "__main__":
    sys.exit(main())
