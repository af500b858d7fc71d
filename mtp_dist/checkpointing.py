"""Engine-independent checkpoint handling: atomic directories, the `latest` pointer, keep-last-K,
per-rank RNG state, metadata checks, and the consolidated export.

A checkpoint is written into `ROOT/.tmp-step_XXXXXXXX`, completed with `meta.json`, then renamed
to `ROOT/step_XXXXXXXX`; `ROOT/latest` (a one-line file) is replaced atomically afterwards. A
process killed at any moment leaves the previous checkpoint intact and `latest` pointing at it.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mtp_dist.errors import UserError
from mtp_dist.files import atomic_path, atomic_write

META = "meta.json"
LATEST = "latest"
CONSOLIDATED_FORMAT = "mtp-dist-consolidated-v1"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be used; the message names it and the fix."""


@functools.cache
def load_errors() -> tuple[type[BaseException], ...]:
    """What torch.load, dist_checkpointing and DeepSpeed raise for missing, truncated or foreign
    checkpoint files: the caller turns them into a CheckpointError naming the checkpoint.
    A function, so that a command that fails before it loads anything (a bad path) does not
    wait for megatron-core's import (seconds)."""
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    return (
        RuntimeError,
        KeyError,
        ValueError,
        EOFError,
        pickle.UnpicklingError,
        CheckpointException,  # a BaseException: `except Exception` misses it
        CheckpointingException,
    )


def load_error(e: BaseException) -> str:
    """One line saying what a load_errors() exception found (torch's CheckpointException holds
    each rank's exception with its traceback: the first rank's exception, without it)."""
    from mtp_dist.errors import underlying

    cause = underlying(e)
    text = " ".join(str(cause).split())[:500]
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    def __init__(self, root: str | Path, keep: int, overwrite: bool = False):
        self.root = Path(root)
        self.keep = keep
        self.overwrite = overwrite

    def committed(self) -> list[Path]:
        """The complete checkpoints, oldest first."""
        return sorted(p for p in self.root.glob("step_*") if (p / META).is_file())

    def resume_path(self, resume: str) -> Path | None:
        """train.resume: auto (the latest checkpoint here, if any), none, or a path (a step_*
        directory, a checkpoints directory or a run directory)."""
        if resume == "none":
            return None
        if resume == "auto":
            return self.latest()
        return find_checkpoint(resume)

    def check_no_overwrite(self, resume: Path | None, resume_step: int) -> None:
        """Refuse a run whose checkpoints would replace committed ones here (it does not
        continue from the newest of them), unless checkpoint.overwrite is set."""
        done = self.committed()
        if self.overwrite or not done:
            return
        newest = done[-1]
        if resume is not None and resume_step >= step_of(newest):
            return
        start = f"step {resume_step} of {resume}" if resume is not None else "scratch"
        raise CheckpointError(
            f"{self.root} already holds checkpoints up to {newest.name}, and this run starts "
            f"from {start}: its checkpoints would replace them. Resume from the newest "
            "(train.resume=auto), use another run.dir or checkpoint.dir, or set "
            "checkpoint.overwrite=true to replace them"
        )

    def check_writable(self) -> None:
        """Fail before any compute if checkpoints could not be written."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe.{os.getpid()}"  # per process: all ranks probe
            atomic_write(probe, "ok")
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
        name = pointer.read_bytes().decode("utf-8", errors="replace").strip()
        if not re.fullmatch(r"step_\d{8}", name):
            raise CheckpointError(
                f"{pointer} is corrupt (it should name a step_XXXXXXXX directory): fix it or "
                "set train.resume to an existing checkpoint"
            )
        path = self.root / name
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
            # Leftovers of a killed save (the run holds the directory's lock: none is live).
            for stale in [*self.root.glob(".tmp-step_*"), *self.root.glob(".replaced-step_*")]:
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
            (tmp / "rng").mkdir()
            (tmp / "engine").mkdir()
        _barrier()
        return tmp

    def abort(self, tmp: Path, is_main: bool) -> None:
        """Remove a checkpoint whose writing failed (rank 0; no barrier: other ranks may be
        gone)."""
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)

    def commit(self, tmp: Path, step: int, meta: dict, is_main: bool) -> Path:
        """Make a fully written temporary checkpoint visible (all ranks call; rank 0 acts)."""
        _barrier()
        final = self.root / f"step_{step:08d}"
        if is_main:
            atomic_write(tmp / META, json.dumps(meta, indent=1))
            replaced = None
            if final.exists():  # only with checkpoint.overwrite (check_no_overwrite)
                if not self.overwrite:
                    raise CheckpointError(f"{final} exists: refusing to replace it")
                replaced = final.with_name(f".replaced-{final.name}")
                os.rename(final, replaced)
            os.rename(tmp, final)
            atomic_write(self.root / LATEST, final.name + "\n")
            if replaced is not None:
                shutil.rmtree(replaced)
            self._prune(final)
        _barrier()
        return final

    def _prune(self, newest: Path) -> None:
        done = self.committed()
        for old in done[: max(0, len(done) - self.keep)]:
            if old != newest:
                shutil.rmtree(old, ignore_errors=True)


def raise_if_disk_full(e: BaseException, directory: Path, need: int) -> None:
    """A CheckpointError if a save failed because the disk is full. torch's writers report a
    full disk as a RuntimeError of their zip writer ("unexpected pos"), not as an OSError, so
    the free space is measured instead, while the partial checkpoint still takes its room."""
    from mtp_dist.errors import underlying

    cause = underlying(e)
    if isinstance(cause, (OSError, UserError, KeyboardInterrupt)):
        return  # these say what happened themselves
    code = re.search(r"\[Errno (\d+)\]", str(cause))
    if code:  # an OSError that a writer thread turned into text
        number = int(code.group(1))
        raise OSError(number, os.strerror(number), str(directory)) from e
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return
    if free < max(need, 64 << 20):
        raise CheckpointError(
            f"saving the checkpoint {directory} failed ({load_error(e)}) with {free >> 20} MiB "
            f"free on its disk, about {need >> 20} MiB being needed: the disk is full; free "
            "disk space or set checkpoint.dir to another disk, then resume (train.resume=auto)"
        ) from e


def step_of(path: Path) -> int:
    """The step of a step_XXXXXXXX checkpoint directory."""
    return int(path.name.removeprefix("step_"))


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint given as itself (a step_* directory), as a checkpoints directory (its
    latest) or as a run directory (RUN/checkpoints/latest)."""
    path = Path(path)
    if (path / META).is_file():
        return path
    for root in (path, path / "checkpoints"):
        if (root / LATEST).is_file():
            return CheckpointManager(root, keep=1).latest()
    raise CheckpointError(
        f"no such checkpoint: {path} is not a checkpoint (a step_* directory with {META}), nor "
        f"a run or checkpoints directory with a `{LATEST}` pointer; give one of those"
    )


def read_meta(path: Path) -> dict:
    try:
        meta = json.loads((Path(path) / META).read_bytes())
    except FileNotFoundError as e:
        raise CheckpointError(
            f"{path} has no {META}: it is not a complete checkpoint; "
            "point train.resume at a step_* directory"
        ) from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}/{META} is corrupt ({e}): resume from another step") from e
    wanted = {"step": int, "consumed_samples": int, "config": dict}
    if not isinstance(meta, dict) or any(
        not isinstance(meta.get(k), t) or isinstance(meta.get(k), bool) for k, t in wanted.items()
    ):
        raise CheckpointError(
            f"{path}/{META} is corrupt (it lacks step, consumed_samples or config, or they have "
            "the wrong type): resume from another step"
        )
    return meta


def check_compatible(meta: dict, model_cfg: dict, tokenizer_hash: str | None, path: Path) -> None:
    """Refuse a checkpoint of another model shape or tokenizer, naming the key."""
    from mtp_dist.model.model import MODEL_KEYS  # megatron-core: imported when needed

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


def export_consolidated(
    model, path: Path, config: dict, step: int, tokenizer_hash: str | None = None
) -> Path | None:
    """One file of full tensors (global names), written by rank 0 to a temporary name and
    renamed. Collective over the model-parallel ranks."""
    from megatron.core import parallel_state

    from mtp_dist.model.weights import full_state

    state = full_state(model) if parallel_state.get_data_parallel_rank() == 0 else None
    if state is None:
        _barrier()
        return None
    write_consolidated(path, state, config, step, tokenizer_hash)
    _barrier()
    return path


def write_consolidated(
    path: Path, state: dict, config: dict, step: int, tokenizer_hash: str | None
) -> Path:
    """The export file: full tensors, the config, the step and the identity of the tokenizer
    training used (so that every reader checks the tokenizer it is given against it)."""
    payload = {
        "format": CONSOLIDATED_FORMAT,
        "step": step,
        "config": config,
        "tokenizer_hash": tokenizer_hash,
        "state": state,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_consolidated(path: str | Path) -> dict:
    """An export's payload, checked (format, step, config, state of tensors). Read with
    weights_only (a file that pickles anything else is refused, never run) and memory-mapped."""
    fix = "give a file written by `python -m mtp_dist.export`, a checkpoint or a Llama directory"
    try:
        payload = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except OSError:
        raise
    except Exception as e:  # a foreign file raises whatever its unpickler or reader does
        reason = " ".join(str(e).split())[:200]
        raise CheckpointError(
            f"{path} cannot be read as an mtp-dist export ({type(e).__name__}: {reason}): {fix}"
        ) from e
    if not isinstance(payload, dict) or payload.get("format") != CONSOLIDATED_FORMAT:
        raise CheckpointError(f"{path} is not an mtp-dist export ({CONSOLIDATED_FORMAT}): {fix}")
    state = payload.get("state")
    step = payload.get("step")
    if (
        not isinstance(step, int)
        or isinstance(step, bool)
        or not isinstance(payload.get("config"), dict)
        or not isinstance(state, dict)
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    ):
        raise CheckpointError(
            f"{path} is a damaged mtp-dist export (its step, config or tensors are missing or of "
            "the wrong type): export it again"
        )
    return payload
