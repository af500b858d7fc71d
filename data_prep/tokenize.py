"""The `tokenize` command: plan shards, pick this SLURM task's share, tokenize them with worker
processes (each writes the shards it tokenizes), merge the manifest, print a summary.

One output directory, many writers: SLURM array tasks share a directory, each writing its own
shards. Each task holds a lock of its own (a second run of the same task is refused), and tasks
that split the inputs differently (another --num-tasks) cannot run on one directory at once,
since they would write the same shards. A failed or interrupted run (Ctrl-C) stops its workers,
removes their partial files and merges the manifest of what finished; a rerun goes on from there.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import sys
import time
from dataclasses import dataclass

from data_prep import manifest as mf
from data_prep.readers import BadInputFile, ReadOptions, plan_input_shards
from data_prep.shards import ShardJob, remove_leftovers, shard_fingerprint, tokenize_shard
from data_prep.tokenizers import Tokenizer, load_tokenizer
from data_prep.workers import run_in_workers
from mtp_dist.errors import UserError
from mtp_dist.files import DirectoryLock, check_not_an_input, is_locked

SHARD_FILES = ("bin", "idx", "json")
"""What each output shard is made of: its tokens, its index and its sidecar."""


class TokenizeError(UserError, ValueError):
    """A tokenize run that cannot go on as asked; the message says why and what to do."""


@dataclass
class TokenizeConfig:
    inputs: list[str]
    out_dir: str
    tokenizer: str
    fmt: str = "auto"
    read_opts: ReadOptions = ReadOptions()
    files_per_shard: int = 1
    hf_num_shards: int = 1
    workers: int = 1
    threads_per_worker: int = 1
    task_index: int = 0
    num_tasks: int = 1
    skip_bad_files: bool = False
    progress: bool = True


def slurm_task(environ=os.environ, num_tasks: int | None = None) -> tuple[int, int]:
    """(task index, number of tasks) from $SLURM_ARRAY_TASK_ID/COUNT, else (0, 1). With
    `num_tasks` given (--num-tasks), only the index comes from the environment: a rerun of some
    tasks (`sbatch --array=3 ... --num-tasks 8`) keeps the original array's split."""
    values = []
    for var, fallback in (("SLURM_ARRAY_TASK_ID", 0), ("SLURM_ARRAY_TASK_COUNT", 1)):
        raw = environ.get(var, "")
        try:
            values.append(int(raw) if raw.strip() else fallback)
        except ValueError:
            raise TokenizeError(
                f"${var}={raw!r} is not an integer: unset it, or pass --task-index and --num-tasks"
            ) from None
    index, count = values[0], num_tasks or values[1]
    if count < 1 or not 0 <= index < count:
        raise TokenizeError(
            f"task {index} is not in [0, {count}) ($SLURM_ARRAY_TASK_ID={index}, "
            f"{'--num-tasks' if num_tasks else '$SLURM_ARRAY_TASK_COUNT'}={count}): submit the "
            f"array as --array=0-{max(count - 1, 0)}, or pass --task-index and --num-tasks "
            "(--num-tasks alone for a rerun of some tasks of a larger array)"
        )
    return index, count


def plan_jobs(cfg: TokenizeConfig) -> list[ShardJob]:
    """All shards of the run, named by their position in the (sorted) input plan."""
    shards = plan_input_shards(cfg.inputs, cfg.fmt, cfg.files_per_shard, cfg.hf_num_shards)
    return [
        ShardJob(
            f"shard-{i:05d}", s, cfg.out_dir, cfg.tokenizer, cfg.read_opts, cfg.threads_per_worker
        )
        for i, s in enumerate(shards)
    ]


def run_tokenize(cfg: TokenizeConfig) -> dict:
    """Tokenize this task's share; return a summary dict. Raises BadInputFile on bad input."""
    if cfg.num_tasks < 1 or not 0 <= cfg.task_index < cfg.num_tasks:
        raise TokenizeError(
            f"--task-index {cfg.task_index} is not in [0, --num-tasks {cfg.num_tasks})"
        )
    tokenizer = load_tokenizer(cfg.tokenizer)
    os.makedirs(cfg.out_dir, exist_ok=True)
    jobs = plan_jobs(cfg)
    names = [j.name for j in jobs]
    outputs = [os.path.join(cfg.out_dir, f"{n}.{ext}") for n in names for ext in SHARD_FILES]
    outputs.append(os.path.join(cfg.out_dir, mf.MANIFEST))
    check_not_an_input(outputs, [p for j in jobs for p in j.shard.paths], "tokenize")
    with task_lock(cfg.out_dir, cfg.task_index, cfg.num_tasks):
        # Round robin rather than contiguous blocks: neighbouring inputs tend to be alike in size.
        mine = [j for i, j in enumerate(jobs) if i % cfg.num_tasks == cfg.task_index]
        todo = [j for j in mine if not _already_done(j, tokenizer)]
        t0 = time.time()
        try:
            results = _run_jobs(todo, tokenizer, cfg)
        except BaseException:
            # Workers are stopped: clear what they left, record what finished, then fail.
            for job in todo:
                remove_leftovers(job.out_dir, job.name)
            with contextlib.suppress(Exception):  # the first failure is the one to report
                mf.merge_manifest(cfg.out_dir, names)
            raise
        manifest = mf.merge_manifest(cfg.out_dir, names)
    elapsed = time.time() - t0
    if manifest["complete"] and manifest["totals"]["documents"] == 0:
        skipped = _sum_counts(s.get("skipped_documents", {}) for s in manifest["shards"])
        raise TokenizeError(
            f"no documents in any input of {cfg.out_dir} ({len(jobs)} shards; records skipped: "
            f"{skipped or 'none'}; bad files: {manifest['totals']['skipped_shards']}): check the "
            "inputs, --format, --text-field and --text-mode"
        )
    done = [r for r in results if r["status"] == "complete"]
    return {
        "out_dir": cfg.out_dir,
        "task": f"{cfg.task_index}/{cfg.num_tasks}",
        "shards_in_run": len(jobs),
        "shards_of_task": len(mine),
        "already_complete": len(mine) - len(todo),
        "tokenized": len(done),
        "skipped_files": [r["error"] for r in results if r["status"] == "skipped"],
        "documents": sum(r["documents"] for r in done),
        "tokens": sum(r["tokens"] for r in done),
        "skipped_documents": _sum_counts(r.get("skipped_documents", {}) for r in done),
        "invalid_utf8_documents": sum(r.get("invalid_utf8_documents", 0) for r in done),
        "seconds": elapsed,
        "directory_complete": manifest["complete"],
    }


_TASK_LOCK = ".tokenize-task-{index}-of-{count}.lock"


@contextlib.contextmanager
def task_lock(out_dir: str, index: int, count: int):
    """Hold this task's lock on out_dir; refuse a running task of another --num-tasks.

    The check of other tasks and the taking of this one's lock happen under the manifest's
    flock, so two runs starting at once cannot both pass the check.
    """
    what = f"tokenize runs of task {index} of {count}"
    lock = DirectoryLock(out_dir, what, name=_TASK_LOCK.format(index=index, count=count))
    with mf.manifest_lock(out_dir):
        pattern = os.path.join(glob.escape(out_dir), _TASK_LOCK.format(index="*", count="*"))
        for path in glob.glob(pattern):
            m = re.search(r"-task-(\d+)-of-(\d+)\.lock$", path)
            if m is None or int(m.group(2)) == count or not is_locked(path):
                continue
            raise TokenizeError(
                f"{out_dir} is being written by task {m.group(1)} of a run with --num-tasks "
                f"{m.group(2)}: tasks that split the inputs differently would write the same "
                f"shards; wait for it to finish, or use --num-tasks {m.group(2)}"
            )
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _already_done(job: ShardJob, tokenizer: Tokenizer) -> bool:
    """Complete shards are kept; a skipped (bad) input is tried again, in case it was fixed."""
    sidecar = mf.read_sidecar(job.out_dir, job.name)
    if not mf.is_complete(job.out_dir, sidecar):
        return False
    expected = shard_fingerprint(job, tokenizer)
    if any(sidecar.get(k) != v for k, v in expected.items()):
        raise TokenizeError(
            f"{mf.sidecar_path(job.out_dir, job.name)} was made from other inputs, options or "
            "tokenizer than this run's; write to a new output directory"
        )
    return True


def _run_jobs(jobs: list[ShardJob], tokenizer: Tokenizer, cfg: TokenizeConfig) -> list[dict]:
    bar = _Progress(sum(j.shard.size_bytes() for j in jobs), cfg.progress)
    try:
        if cfg.workers <= 1 or len(jobs) <= 1:
            return [tokenize_shard(j, tokenizer, cfg.skip_bad_files, bar.update) for j in jobs]
        # Largest shards first: the run ends with small shards, so no worker idles long at the end.
        by_size = sorted(jobs, key=lambda j: j.shard.size_bytes(), reverse=True)
        results = run_in_workers(
            by_size,
            lambda job, progress: tokenize_shard(job, tokenizer, cfg.skip_bad_files, progress),
            cfg.workers,
            bar.update,
            describe=lambda job: f"{job.name} ({', '.join(job.shard.paths)})",
        )
        return sorted(results, key=lambda r: r["shard"])
    finally:
        bar.close()


class _Progress:
    """tqdm over input bytes (for the ETA) with documents/s and tokens/s alongside."""

    def __init__(self, total_bytes: int, enabled: bool) -> None:
        self.t0 = time.time()
        self.docs = self.tokens = 0
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_bytes, unit="B", unit_scale=True, desc="tokenize", file=sys.stderr
            )

    def update(self, nbytes: int, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        if self.bar is not None:
            dt = max(time.time() - self.t0, 1e-9)
            self.bar.set_postfix_str(
                f"{self.docs / dt:,.0f} docs/s, {self.tokens / dt / 1e6:.2f}M tokens/s",
                refresh=False,
            )
            self.bar.update(nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _sum_counts(dicts) -> dict:
    total: dict = {}
    for d in dicts:
        for k, v in d.items():
            total[k] = total.get(k, 0) + v
    return dict(sorted(total.items()))


def format_summary(s: dict) -> str:
    rate = s["tokens"] / s["seconds"] if s["seconds"] > 0 else 0.0
    lines = [
        f"output        {s['out_dir']} (task {s['task']}; directory complete: "
        f"{s['directory_complete']})",
        f"shards        {s['tokenized']} tokenized, {s['already_complete']} already complete, "
        f"{len(s['skipped_files'])} bad files skipped, of {s['shards_of_task']} for this task "
        f"({s['shards_in_run']} in the run)",
        f"documents     {s['documents']:,} (skipped: {s['skipped_documents'] or 'none'}; "
        f"invalid UTF-8 replaced in {s['invalid_utf8_documents']})",
        f"tokens        {s['tokens']:,} in {s['seconds']:.1f} s ({rate / 1e6:.2f} M tokens/s)",
    ]
    lines += [f"skipped file  {e}" for e in s["skipped_files"]]
    return "\n".join(lines)


__all__ = [
    "TokenizeConfig",
    "TokenizeError",
    "run_tokenize",
    "format_summary",
    "BadInputFile",
    "plan_jobs",
]
