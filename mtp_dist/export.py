"""`python -m mtp_dist.export CHECKPOINT OUT [--format pt|hf]`: a checkpoint (any TP/PP/DP
layout, either engine) as

- pt (default): one file of full tensors by global parameter name, with the model config;
- hf: a Hugging Face directory that transformers loads as LlamaForCausalLM (the trunk and head
  1), heads 2..n in mtp_heads.safetensors, and the tokenizer the run recorded (model/hf.py).

Runs as one process: the checkpoint is resharded to TP1 x PP1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mtp_dist.errors import UserError, run_cli


def export(checkpoint: Path, out: Path, fmt: str = "pt", tokenizer: str | None = None) -> Path:
    """tokenizer (hf only): a tokenizer to write instead of the one the run recorded, or
    "none" for no tokenizer files."""
    from mtp_dist import checkpointing as ckpt
    from mtp_dist import config as config_mod
    from mtp_dist import distributed
    from mtp_dist.inference import load
    from mtp_dist.init_from import checkpoint_model
    from mtp_dist.model import hf
    from mtp_dist.model.weights import full_state

    checkpoint = ckpt.find_checkpoint(checkpoint)
    meta = ckpt.read_meta(checkpoint)
    cfg = config_mod.from_dict(dict(meta["config"], parallel={"tensor": 1, "pipeline": 1}))
    if fmt == "hf":
        hf.check_empty(out)
        source = load.Source(checkpoint, meta["config"], meta["step"],
                             tokenizer_hash=meta.get("tokenizer_hash"))  # fmt: skip
        tok = load.load_tokenizer(source, cfg, tokenizer, optional=True)
    with distributed.single_process(cfg.train.seed):
        model = checkpoint_model(checkpoint, meta)
        if fmt == "pt":
            return ckpt.export_consolidated(model, out, cfg.to_dict(), meta["step"])
        state = full_state(model)
    return hf.write_dir(out, state, cfg.model, tok, cfg.to_dict()["model"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mtp_dist.export", description=__doc__)
    p.add_argument(
        "checkpoint",
        type=Path,
        help="a step_* checkpoint directory, a checkpoints directory or a run directory (both: "
        "their latest checkpoint)",
    )
    p.add_argument("out", type=Path, help="output .pt file (pt) or a new directory (hf)")
    p.add_argument(
        "--format",
        choices=("pt", "hf"),
        default="pt",
        help="pt: one file of full tensors; hf: a Hugging Face Llama directory",
    )
    p.add_argument(
        "--tokenizer",
        help="hf: the tokenizer to include (a sentencepiece .model or 'none'); default: the one "
        "the run recorded (data.tokenizer)",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="also show upstream packages' warnings (or set MTP_DIST_VERBOSE=1)",
    )
    args = p.parse_args(argv)
    return run_cli(lambda: _main(args))


def _main(args) -> int:
    from mtp_dist.compat import quiet_upstream_warnings

    quiet_upstream_warnings(args.verbose)
    if args.tokenizer is not None and args.format != "hf":
        raise UserError("--tokenizer goes with --format hf (a .pt export holds no tokenizer)")
    path = export(args.checkpoint, args.out, args.format, args.tokenizer)
    print(f"exported {args.checkpoint} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
