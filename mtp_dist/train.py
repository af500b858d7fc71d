"""`python -m mtp_dist.train --config FILE [dotted.key=value ...]`

Runs as one process or under torchrun / the deepspeed launcher / srun. Every problem that can be
seen before compute (config, world size, data, checkpoint directory, checkpoint shape) is a
one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from mtp_dist import config as config_mod


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
    warnings.filterwarnings("ignore")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from mtp_dist.checkpointing import CheckpointError
    from mtp_dist.data import TokenizerMismatchError
    from mtp_dist.trainer import TrainingStopped

    try:
        cfg = config_mod.load(args.config, args.overrides)
        return run(cfg)
    except (config_mod.ConfigError, CheckpointError, TokenizerMismatchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 3


def _tokenizer_hash(cfg) -> str | None:
    if cfg.data.synthetic or cfg.data.tokenizer is None:
        return None
    from data_prep.tokenizers import load_tokenizer

    return load_tokenizer(cfg.data.tokenizer).identity_hash


def run(cfg) -> int:
    import torch

    from mtp_dist import distributed
    from mtp_dist.checkpointing import CheckpointManager
    from mtp_dist.data import build_datasets
    from mtp_dist.engines import build_engine
    from mtp_dist.metrics import Metrics
    from mtp_dist.model.model import build_model
    from mtp_dist.model.weights import init_weights
    from mtp_dist.trainer import Trainer

    launch = distributed.read_launch_env()
    cfg.data_parallel_size(launch.world_size)  # layout errors before any process group
    for path in [] if cfg.data.synthetic else cfg.data.paths:
        if not Path(path).exists():
            raise config_mod.ConfigError(
                f"data.paths entry {path} does not exist: run `python -m data_prep tokenize` "
                "first or fix the path"
            )
    run_dir = Path(cfg.run.dir)
    manager = CheckpointManager(cfg.checkpoint.dir or run_dir / "checkpoints", cfg.checkpoint.keep)
    manager.check_writable()
    tok_hash = _tokenizer_hash(cfg)

    dims = distributed.init(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.train.seed)
    try:
        if dims.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            cfg.dump(run_dir / "config.yaml")
        on_gpu = dims.device.type == "cuda"
        dtype = (
            torch.bfloat16
            if cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and on_gpu)
            else torch.float32
        )
        model = build_model(
            cfg.model,
            dims.tp,
            dims.pp,
            dims.pp_rank,
            dtype=dtype,
            device=dims.device,
            recompute=cfg.train.recompute,
        )
        init_weights(model, cfg.train.seed)
        engine = build_engine(cfg, dims, model)
        t = cfg.train
        evals = (t.steps // t.eval_interval + 1) * t.eval_steps if t.eval_interval else 0
        train_ds, valid_ds, _ = build_datasets(
            cfg.data.paths,
            cfg.data.weights,
            cfg.data.split,
            cfg.model.seq_length,
            cfg.model.n_future_tokens,
            t.seed,
            (t.steps * t.global_batch_size, evals * t.global_batch_size, 0),
            cfg.model.vocab_size,
            tok_hash,
            synthetic=cfg.data.synthetic,
            cache_dir=cfg.data.cache_dir,
        )
        trainer = Trainer(cfg, dims, engine, (train_ds, valid_ds), manager, tok_hash)
        resume = trainer.resume_path()
        if resume is not None:
            trainer.resume(resume)
        metrics = Metrics(cfg, run_dir, dims.is_main, resume_id=trainer.wandb_id)
        trainer.wandb_id = metrics.wandb_id
        try:
            code = trainer.run(metrics)
        finally:
            metrics.close()
        if dims.is_main:
            print(
                f"run directory {run_dir.resolve()} | checkpoints {manager.root.resolve()} | "
                f"metrics {(run_dir / 'metrics.jsonl').resolve()}",
                flush=True,
            )
        return code
    finally:
        distributed.destroy()


if __name__ == "__main__":
    sys.exit(main())
