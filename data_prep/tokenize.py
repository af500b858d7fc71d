"""The `tokenize` command: plan shards, pick this SLURM task's share, tokenize them with a pool of
workers (each writes the shards it tokenizes), merge the manifest, print a summary."""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass

from data_prep import manifest as mf
from data_prep.readers import BadInputFile, ReadOptions, plan_input_shards
from data_prep.shards import ShardJob, shard_fingerprint, tokenize_shard
from data_prep.tokenizers import Tokenizer, load_tokenizer
from mtp_dist.compat.megatron_data import batched_builder_class


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


def slurm_task_default(var: str, fallback: int) -> int:
    value = os.environ.get(var)
    return int(value) if value not in (None, "") else fallback


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
    if not 0 <= cfg.task_index < cfg.num_tasks:
        raise ValueError(f"--task-index {cfg.task_index} not in [0, --num-tasks {cfg.num_tasks})")
    tokenizer = load_tokenizer(cfg.tokenizer)
    os.makedirs(cfg.out_dir, exist_ok=True)
    jobs = plan_jobs(cfg)
    # Round robin rather than contiguous blocks: neighbouring inputs tend to be of similar size.
    mine = [j for i, j in enumerate(jobs) if i % cfg.num_tasks == cfg.task_index]
    todo = [j for j in mine if not _already_done(j, tokenizer)]
    batched_builder_class()  # import megatron-core once, before forking workers and timing
    t0 = time.time()
    results = _run_jobs(todo, tokenizer, cfg)
    manifest = mf.merge_manifest(cfg.out_dir, [j.name for j in jobs])
    elapsed = time.time() - t0
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


def _already_done(job: ShardJob, tokenizer: Tokenizer) -> bool:
    sidecar = mf.read_sidecar(job.out_dir, job.name)
    if not mf.is_complete(job.out_dir, sidecar):
        return False
    expected = shard_fingerprint(job, tokenizer)
    if any(sidecar.get(k) != v for k, v in expected.items()):
        raise ValueError(
            f"{mf.sidecar_path(job.out_dir, job.name)} was made from other inputs, options or "
            "tokenizer than this run's; write to a new output directory"
        )
    return True


def _run_jobs(jobs: list[ShardJob], tokenizer: Tokenizer, cfg: TokenizeConfig) -> list[dict]:
    bar = _Progress(sum(j.shard.size_bytes() for j in jobs), cfg.progress)
    try:
        if cfg.workers <= 1 or len(jobs) <= 1:
            return [tokenize_shard(j, tokenizer, cfg.skip_bad_files, bar.update) for j in jobs]
        return _run_pool(jobs, cfg, bar)
    finally:
        bar.close()


def _run_pool(jobs: list[ShardJob], cfg: TokenizeConfig, bar: _Progress) -> list[dict]:
    # fork: workers inherit the imported megatron-core (seconds to import, see run_tokenize)
    # instead of importing it each.
    ctx = mp.get_context("fork")
    queue = ctx.SimpleQueue()
    results: list[dict] = []
    with ProcessPoolExecutor(
        min(cfg.workers, len(jobs)), mp_context=ctx, initializer=_worker_init, initargs=(queue,)
    ) as pool:
        # Largest shards first: the run ends with small shards, so no worker idles long at the end.
        by_size = sorted(jobs, key=lambda j: j.shard.size_bytes(), reverse=True)
        futures = [pool.submit(_worker_run, j, cfg.skip_bad_files) for j in by_size]
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
            while not queue.empty():
                bar.update(*queue.get())
            for f in finished:
                if f.exception() is not None:
                    for p in pending:
                        p.cancel()
                    raise f.exception()
                results.append(f.result())
    while not queue.empty():
        bar.update(*queue.get())
    return sorted(results, key=lambda r: r["shard"])


_worker_state: dict = {}


def _worker_init(queue) -> None:
    # Die with the parent: a killed run must not leave workers writing into the output dir.
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_state["queue"] = queue
    _worker_state["tokenizers"] = {}


def _worker_run(job: ShardJob, skip_bad_files: bool) -> dict:
    cache = _worker_state["tokenizers"]
    if job.tokenizer_spec not in cache:
        cache[job.tokenizer_spec] = load_tokenizer(job.tokenizer_spec)
    queue = _worker_state["queue"]
    return tokenize_shard(
        job, cache[job.tokenizer_spec], skip_bad_files, lambda *inc: queue.put(inc)
    )


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


__all__ = ["TokenizeConfig", "run_tokenize", "format_summary", "BadInputFile", "plan_jobs"]
