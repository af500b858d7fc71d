"""Engine-independent checkpoint handling: atomic directories, the `latest` pointer, keep-last-K,
per-rank RNG state, metadata checks, and the consolidated export.

A checkpoint is written into `ROOT/.tmp-step_XXXXXXXX`, completed with `meta.json`, then renamed
to `ROOT/step_XXXXXXXX`; `ROOT/latest` (a one-line file) is replaced atomically afterwards. A
process killed at any moment leaves the previous checkpoint intact and `latest` pointing at it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mtp_dist.model.model import MODEL_KEYS

META = "meta.json"
LATEST = "latest"
CONSOLIDATED_FORMAT = "mtp-dist-consolidated-v1"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names it and the fix."""


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    def __init__(self, root: str | Path, keep: int):
        self.root = Path(root)
        self.keep = keep

    def check_writable(self) -> None:
        """Fail before any compute if checkpoints could not be written."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise CheckpointError(
                f"checkpoint directory {self.root} is not writable ({e.strerror}): "
                "set checkpoint.dir to a writable path"
            ) from e

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        if not (path / META).is_file():
            raise CheckpointError(
                f"{pointer} points at {path}, which is not a complete checkpoint: "
                "fix the pointer or set train.resume to an existing checkpoint"
            )
        return path

    def begin(self, step: int, is_main: bool) -> Path:
        tmp = self.root / f".tmp-step_{step:08d}"
        if is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-step_*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
            (tmp / "rng").mkdir()
            (tmp / "engine").mkdir()
        _barrier()
        return tmp

    def commit(self, tmp: Path, step: int, meta: dict, is_main: bool) -> Path:
        """Make a fully written temporary checkpoint visible (all ranks call; rank 0 acts)."""
        _barrier()
        final = self.root / f"step_{step:08d}"
        if is_main:
            atomic_write_text(tmp / META, json.dumps(meta, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            atomic_write_text(self.root / LATEST, final.name + "\n")
            self._prune(final)
        _barrier()
        return final

    def _prune(self, newest: Path) -> None:
        done = sorted(p for p in self.root.glob("step_*") if (p / META).is_file())
        for old in done[: max(0, len(done) - self.keep)]:
            if old != newest:
                shutil.rmtree(old, ignore_errors=True)


def read_meta(path: Path) -> dict:
    try:
        return json.loads((Path(path) / META).read_text())
    except FileNotFoundError as e:
        raise CheckpointError(
            f"{path} has no {META}: it is not a complete checkpoint; "
            "point train.resume at a step_* directory"
        ) from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}/{META} is corrupt ({e}): resume from another step") from e


def check_compatible(meta: dict, model_cfg: dict, tokenizer_hash: str | None, path: Path) -> None:
    """Refuse a checkpoint of another model shape or tokenizer, naming the key."""
    saved = meta.get("config", {}).get("model", {})
    for key in MODEL_KEYS:
        if key in saved and saved[key] != model_cfg.get(key):
            raise CheckpointError(
                f"checkpoint {path} has model.{key}={saved[key]!r} but the config says "
                f"{model_cfg.get(key)!r}: use the checkpoint's model config or another checkpoint"
            )
    saved_tok = meta.get("tokenizer_hash")
    if saved_tok and tokenizer_hash and saved_tok != tokenizer_hash:
        raise CheckpointError(
            f"checkpoint {path} was trained with tokenizer {saved_tok[:12]} but the data uses "
            f"{tokenizer_hash[:12]}: use the same tokenizer (data.tokenizer) or start afresh"
        )


def save_rng(directory: Path, rank: int) -> None:
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    torch.save(state, directory / "rng" / f"rank_{rank:05d}.pt")


def load_rng(directory: Path, rank: int) -> bool:
    """Restore this rank's RNG streams; False if the checkpoint has none for this rank (it was
    saved at another world size)."""
    from megatron.core import tensor_parallel

    path = directory / "rng" / f"rank_{rank:05d}.pt"
    if not path.is_file():
        return False
    state = torch.load(path, weights_only=False)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    return True


def export_consolidated(model, path: Path, config: dict, step: int) -> Path | None:
    """One file of full tensors (global names), written by rank 0 to a temporary name and
    renamed. Collective over the model-parallel ranks."""
    from megatron.core import parallel_state

    from mtp_dist.model.weights import full_state

    state = full_state(model) if parallel_state.get_data_parallel_rank() == 0 else None
    if state is None:
        _barrier()
        return None
    payload = {"format": CONSOLIDATED_FORMAT, "step": step, "config": config, "state": state}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    _barrier()
    return path


def load_consolidated(path: str | Path) -> dict:
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("format") != CONSOLIDATED_FORMAT:
        raise CheckpointError(f"{path} is not an mtp-dist consolidated export")
    return payload
