"""`python -m mtp_dist.export CHECKPOINT OUT.pt`: a checkpoint (any TP/PP/DP layout) to one file
of full tensors by global parameter name, with the model config: the format inference and
inspection read, whichever engine trained the model.

Runs as one process: megatron-core's dist_checkpointing reshards the model to TP1 x PP1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mtp_dist.errors import run_cli


def export(checkpoint: Path, out: Path) -> Path:
    from mtp_dist import checkpointing as ckpt
    from mtp_dist import config as config_mod
    from mtp_dist import distributed
    from mtp_dist.engines import engine_class
    from mtp_dist.model.model import build_model

    checkpoint = ckpt.find_checkpoint(checkpoint)
    meta = ckpt.read_meta(checkpoint)
    data = meta["config"]
    data["parallel"] = {"tensor": 1, "pipeline": 1}
    cfg = config_mod.from_dict(data)
    engine = engine_class(meta.get("engine", "megatron"))
    distributed.init(1, 1, seed=cfg.train.seed)
    try:
        model = build_model(cfg.model)
        try:
            engine.load_full_weights(checkpoint / "engine", model)
        except ckpt.LOAD_ERRORS as e:
            raise ckpt.CheckpointError(f"checkpoint {checkpoint} cannot be loaded: {e}") from e
        return ckpt.export_consolidated(model, out, cfg.to_dict(), meta["step"])
    finally:
        distributed.destroy()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mtp_dist.export", description=__doc__)
    p.add_argument(
        "checkpoint",
        type=Path,
        help="a step_* checkpoint directory, a checkpoints directory or a run directory (both: "
        "their latest checkpoint)",
    )
    p.add_argument("out", type=Path, help="output .pt file")
    args = p.parse_args(argv)
    return run_cli(lambda: _main(args))


def _main(args) -> int:
    from mtp_dist.compat import ignore_known_warnings

    ignore_known_warnings()
    path = export(args.checkpoint, args.out)
    print(f"exported {args.checkpoint} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
