"""DeepSpeed checkpoints beyond save/load: the universal conversion (a checkpoint that loads at
another data-parallel size) and the full weights for the consolidated export.

`python -m mtp_dist.engines.deepspeed to-universal CHECKPOINT OUT` converts a trainer checkpoint.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import torch

from mtp_dist.checkpointing import CheckpointError, load_error, load_errors
from mtp_dist.errors import run_cli
from mtp_dist.model.model import MTPModel

TAG = "deepspeed"
"""The engine's save(directory) puts DeepSpeed's tag folder at directory/TAG, so every file
stays inside the trainer's checkpoint directory."""


def is_universal(directory: str) -> bool:
    """A universal checkpoint keeps one folder per parameter under zero/."""
    return os.path.isdir(os.path.join(directory, TAG, "zero"))


def load_model_weights(model: MTPModel, engine_dir: str | os.PathLike) -> None:
    """Full fp32 weights of a checkpoint save() wrote, into a single-process (TP1 x PP1) model,
    without a process group beyond the caller's: for the consolidated export. ZeRO-1/2/3.
    Checkpoints saved with tensor or pipeline parallelism are refused (not converted)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from mtp_dist.model.weights import load_full

    source = os.path.join(engine_dir, TAG)
    files = sorted(f for f in os.listdir(source) if f.endswith("model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{engine_dir} holds no DeepSpeed checkpoint ({TAG}/)")
    if any("mp_rank_00" not in f for f in files):
        raise NotImplementedError(
            f"{engine_dir}: exporting a DeepSpeed checkpoint saved with parallel.tensor or "
            "parallel.pipeline > 1 is not supported; save it at TP1 x PP1 (any DP size) first"
        )
    state = get_fp32_state_dict_from_zero_checkpoint(str(engine_dir), tag=TAG)
    state = {k: v for k, v in state.items() if v is not None}
    wanted = {name for name, _ in model.named_parameters()}
    if wanted - set(state):
        state.update(_frozen_parameters(os.path.join(source, files[0]), wanted - set(state)))
    with torch.no_grad():
        load_full(model, state)


def _frozen_parameters(model_states: str, names: set[str]) -> dict:
    """Parameters that trained frozen (train.trainable=heads) from the module state DeepSpeed
    saves with ZeRO-1/2: the optimizer never held them, so zero_to_fp32 leaves them out
    (ZeRO-3 records them itself). They were never updated: their saved values are exact."""
    module = torch.load(model_states, map_location="cpu", weights_only=False).get("module") or {}
    return {k: module[k].float() for k in names if torch.is_tensor(module.get(k))}


def _without_empty_extra_state(source: str, staging: str) -> None:
    """Stage `source` for ds_to_universal: megatron-core's linear layers put `_extra_state:
    None` into the module state, which the converter tries to save as a tensor. The model-state
    files are rewritten without those entries; everything else is linked, not copied."""
    for name in os.listdir(source):
        src = os.path.join(source, name)
        if name.startswith("mp_rank_") and name.endswith("_model_states.pt"):
            state = torch.load(src, map_location="cpu", weights_only=False)
            module = state.get("module")
            if module is not None:
                state["module"] = type(module)((k, v) for k, v in module.items() if v is not None)
            torch.save(state, os.path.join(staging, name))
        else:
            os.symlink(os.path.abspath(src), os.path.join(staging, name))


def to_universal(checkpoint_dir: str, out_dir: str, workers: int = 1) -> None:
    """Convert the directory one save() wrote into a universal checkpoint (another directory
    that load() accepts at any data-parallel size). Stage 1/2 checkpoints lack some state the
    format needs; inject_missing_state adds it (ignored for stage 3)."""
    from deepspeed.checkpoint import ds_to_universal

    source = os.path.join(checkpoint_dir, TAG)
    if not os.path.isdir(source):
        raise FileNotFoundError(f"{checkpoint_dir} holds no DeepSpeed checkpoint ({TAG}/)")
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".staging-") as staging:
        _without_empty_extra_state(source, staging)
        args = argparse.Namespace(
            input_folder=staging,
            output_folder=os.path.join(out_dir, TAG),
            num_extract_workers=workers,
            num_merge_workers=workers,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,
        )
        ds_to_universal.main(args)


def convert_training_checkpoint(step_dir: str, out_dir: str, workers: int = 1) -> None:
    """A trainer checkpoint (meta.json + engine/) -> the same with a universal engine/, which
    train.resume accepts at another data-parallel size. Built under a temporary name, then
    renamed, so an interrupted conversion leaves nothing that looks complete."""
    out = os.path.abspath(out_dir)
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(os.path.join(tmp, "engine"))
        to_universal(os.path.join(step_dir, "engine"), os.path.join(tmp, "engine"), workers)
        shutil.copy(os.path.join(step_dir, "meta.json"), os.path.join(tmp, "meta.json"))
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m mtp_dist.engines.deepspeed", description="DeepSpeed checkpoint tools"
    )
    sub = ap.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("to-universal", help="convert a checkpoint to a universal checkpoint")
    conv.add_argument(
        "checkpoint_dir",
        help="a training checkpoint (step_* with meta.json), or the directory save() wrote",
    )
    conv.add_argument("out_dir", help="where the universal checkpoint goes (must not exist)")
    conv.add_argument("--workers", type=int, default=1, help="extract/merge processes")
    # Parsed inside run_cli: --help into a closed pipe ends as quietly as any output.
    return run_cli(lambda: _to_universal(ap.parse_args(argv)))


def _to_universal(args) -> int:
    source = args.checkpoint_dir
    training = os.path.isfile(os.path.join(source, "meta.json"))
    engine_dir = os.path.join(source, "engine") if training else source
    if not os.path.isdir(os.path.join(engine_dir, TAG)):
        raise CheckpointError(
            f"{source} is not a directory with a DeepSpeed checkpoint (no meta.json + engine/"
            f"{TAG}/, nor {TAG}/): give a step_* directory written with engine=deepspeed"
        )
    if os.path.exists(args.out_dir):
        raise CheckpointError(f"{args.out_dir} already exists: give a new output directory")
    try:
        if training:
            convert_training_checkpoint(source, args.out_dir, args.workers)
        else:
            to_universal(source, args.out_dir, args.workers)
    except load_errors() as e:
        raise CheckpointError(f"{args.checkpoint_dir} cannot be converted: {load_error(e)}") from e
    print(f"universal checkpoint: {os.path.abspath(args.out_dir)}")
    return 0
