"""`python -m mtp_dist.export CHECKPOINT OUT.pt`: a checkpoint (any TP/PP/DP layout) to one file
of full tensors by global parameter name, with the model config: the format inference and
inspection read, whichever engine trained the model.

Runs as one process: megatron-core's dist_checkpointing reshards the model to TP1 x PP1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def export(checkpoint: Path, out: Path) -> Path:
    from mtp_dist import checkpointing as ckpt
    from mtp_dist import config as config_mod
    from mtp_dist import distributed
    from mtp_dist.engines import engine_class
    from mtp_dist.model.model import build_model

    meta = ckpt.read_meta(checkpoint)
    data = meta["config"]
    data["parallel"] = {"tensor": 1, "pipeline": 1}
    cfg = config_mod.from_dict(data)
    engine = engine_class(meta.get("engine", "megatron"))
    distributed.init(1, 1, seed=cfg.train.seed)
    try:
        model = build_model(cfg.model)
        engine.load_full_weights(checkpoint / "engine", model)
        return ckpt.export_consolidated(model, out, cfg.to_dict(), meta["step"])
    finally:
        distributed.destroy()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mtp_dist.export", description=__doc__)
    p.add_argument("checkpoint", type=Path, help="a step_* checkpoint directory")
    p.add_argument("out", type=Path, help="output .pt file")
    args = p.parse_args(argv)
    from mtp_dist.checkpointing import CheckpointError
    from mtp_dist.compat import ignore_known_warnings
    from mtp_dist.config import ConfigError

    ignore_known_warnings()
    try:
        path = export(args.checkpoint, args.out)
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
