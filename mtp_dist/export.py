"""`python -m mtp_dist.export SOURCE OUT [--format pt|hf]`: a model source (sources.py; usually
a checkpoint of any TP/PP/DP layout, either engine) as

- pt (default): one file of full tensors by global parameter name, with the model config, the
  step and the identity of the tokenizer training used;
- hf: a Hugging Face directory that transformers loads as LlamaForCausalLM (the trunk and head
  1), heads 2..n in mtp_heads.safetensors, the tokenizer the run recorded (model/hf.py), and
  mtp_dist.json (the tokenizer's identity, the step).

Runs as one process: a checkpoint is resharded to TP1 x PP1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mtp_dist.errors import UserError, run_cli


def export(source_path: Path, out: Path, fmt: str = "pt", tokenizer: str | None = None) -> Path:
    """tokenizer (hf only): a tokenizer to write instead of the one the run recorded, or
    "none" for no tokenizer files."""
    from mtp_dist import checkpointing as ckpt
    from mtp_dist import sources
    from mtp_dist.files import check_not_an_input
    from mtp_dist.model import hf_dir

    source = sources.open_source(source_path)
    check_not_an_input(out, [source.path], "the export", within=True)
    config = source.config.to_dict()
    if fmt == "pt":
        state = source.full_state(source.config.train.seed)
        return ckpt.write_consolidated(out, state, config, source.step, source.tokenizer_hash)
    hf_dir.check_empty(out)
    tok = sources.load_tokenizer(source, tokenizer, optional=True)
    state = source.full_state(source.config.train.seed)
    return hf_dir.write_dir(
        out, state, source.model, tok, config["model"], source.tokenizer_hash, source.step
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mtp_dist.export", description=__doc__)
    p.add_argument(
        "source",
        type=Path,
        help="a step_* checkpoint directory, a checkpoints directory or a run directory (both: "
        "their latest checkpoint); also an export (.pt) or a Hugging Face Llama directory",
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
    # Parsed inside run_cli: --help into a closed pipe ends as quietly as any output.
    return run_cli(lambda: _main(p.parse_args(argv)))


def _main(args) -> int:
    from mtp_dist.compat import quiet_upstream_warnings

    quiet_upstream_warnings(args.verbose)
    if args.tokenizer is not None and args.format != "hf":
        raise UserError("--tokenizer goes with --format hf (a .pt export holds no tokenizer)")
    path = export(args.source, args.out, args.format, args.tokenizer)
    print(f"exported {args.source} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
