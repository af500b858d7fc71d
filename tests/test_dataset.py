"""Training-side data: windows of seq_length + n tokens, deterministic order independent of the
DP layout, resumable, tokenizer checks, synthetic mode, and multi-rank building on gloo."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from test_data_prep_formats import tokenize, write_jsonl
from test_data_prep_support import ROOT, spm_model, stdlib_docs

from data_prep.tokenizers import ByteTokenizer, load_tokenizer
from mtp_dist.data import TokenizerMismatchError, build_datasets, microbatches

S, N = 32, 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two spm-tokenized directories (3 shards, 1 shard) and one byte-tokenized single doc."""
    root = tmp_path_factory.mktemp("shards")
    docs = stdlib_docs(60)
    for i in range(3):
        write_jsonl(root / f"a{i}.jsonl", docs[20 * i : 20 * i + 20])
    write_jsonl(root / "b.jsonl", docs[:20])
    tokenize([root / "a*.jsonl"], root / "A")
    tokenize([root / "b.jsonl"], root / "B")
    write_jsonl(root / "one.jsonl", [docs[0] * 3])
    tokenize([root / "one.jsonl"], root / "byte", tokenizer="byte")
    return root


def _build(shards, paths=("A",), weights=None, **kw):
    tok = load_tokenizer(kw.pop("tokenizer", spm_model()))
    args = dict(
        split="90,5,5",
        seq_length=S,
        n_future_tokens=N,
        seed=1234,
        num_samples=(64, 8, 0),
        vocab_size=tok.vocab_size,
        tokenizer_hash=tok.identity_hash,
        cache_dir=str(shards / "cache"),
    )
    args.update(kw)
    return build_datasets([str(shards / p) for p in paths], weights, **args)


def test_samples_are_windows_of_seq_length_plus_n(shards):
    tok = ByteTokenizer()
    train, valid, test = _build(
        shards, ("byte",), split="100,0,0", num_samples=(20, 0, 0), tokenizer="byte"
    )
    assert valid is None and test is None and len(train) >= 20
    doc = (stdlib_docs(1)[0] * 3).encode()
    stream = "".join(map(chr, list(doc) + [tok.eod_id])) * 3  # epochs repeat the document
    for i in range(20):
        item = train[i]
        assert set(item) == {"tokens", "loss_mask"}
        assert item["tokens"].shape == (S + N,) and item["tokens"].dtype == torch.long
        assert item["loss_mask"].dtype == torch.float32 and bool(item["loss_mask"].all())
        # Every head has real targets: the window is S + n consecutive tokens of the data.
        assert "".join(map(chr, item["tokens"].tolist())) in stream


def test_blend_split_and_determinism(shards):
    train, valid, test = _build(shards, ("A", "B"), weights=[0.75, 0.25])
    assert len(train) >= 64 and len(valid) >= 8 and test is None
    again, _, _ = _build(shards, ("A", "B"), weights=[0.75, 0.25], cache_dir=str(shards / "c2"))
    for i in range(0, 64, 7):
        assert torch.equal(train[i]["tokens"], again[i]["tokens"])
    other_seed, _, _ = _build(shards, ("A", "B"), weights=[0.75, 0.25], seed=5)
    assert any(not torch.equal(train[i]["tokens"], other_seed[i]["tokens"]) for i in range(8))
    ids = train.inner.dataset_index[:64].tolist()
    from_a = sum(i < 3 for i in ids)  # dataset ids 0-2 are A's three shards, 3 is B's
    assert 40 <= from_a <= 56


def test_same_samples_on_one_and_two_dp_ranks_and_resumable(shards):
    train, _, _ = _build(shards)
    one = microbatches(train, 2, 8, 0, 1, consumed_samples=0)
    two = [microbatches(train, 2, 8, r, 2, consumed_samples=0) for r in range(2)]
    single = torch.cat([next(one)["tokens"] for _ in range(4 * 3)])  # 3 global batches
    union = []
    for _ in range(3):
        for rank in two:
            union += [next(rank)["tokens"] for _ in range(2)]
    assert torch.equal(single, torch.cat(union))
    resumed = microbatches(train, 2, 8, 0, 1, consumed_samples=8)
    assert torch.equal(torch.cat([next(resumed)["tokens"] for _ in range(8)]), single[8:])
    batch = next(microbatches(train, 4, 8, 1, 2, consumed_samples=0))
    assert batch["tokens"].shape == (4, S + N) and batch["loss_mask"].shape == (4, S + N)
    with pytest.raises(ValueError, match="multiple"):
        next(microbatches(train, 3, 8, 0, 2, 0))


def test_tokenizer_mismatch_is_refused(shards):
    with pytest.raises(TokenizerMismatchError, match=str(shards / "A")):
        _build(shards, vocab_size=32000)
    with pytest.raises(TokenizerMismatchError, match="hash"):
        _build(shards, tokenizer_hash="0" * 64)
    with pytest.raises(TokenizerMismatchError):
        _build(shards, ("A", "byte"), tokenizer_hash=None)


def test_incomplete_directory_is_refused(shards, tmp_path):
    write_jsonl(tmp_path / "x.jsonl", stdlib_docs(3))
    write_jsonl(tmp_path / "y.jsonl", stdlib_docs(3))
    # Task 0 of 2: the other task's shard is still missing.
    tokenize([tmp_path / "*.jsonl"], tmp_path / "out", task_index=0, num_tasks=2)
    with pytest.raises(ValueError, match="incomplete"):
        build_datasets(
            [str(tmp_path / "out")],
            None,
            "100,0,0",
            S,
            N,
            1,
            (4, 0, 0),
            load_tokenizer(spm_model()).vocab_size,
        )


def test_synthetic_mode_has_the_same_shape():
    train, valid, _ = build_datasets(
        None, None, "98,1,1", S, N, 1, (16, 4, 0), 1000, synthetic=True
    )
    item = train[3]
    assert item["tokens"].shape == (S + N,) and bool(item["loss_mask"].all())
    assert int(item["tokens"].max()) < 1000 and valid is not None


_RANK_SCRIPT = """
import json, sys, torch, torch.distributed as dist
dist.init_process_group("gloo")
from mtp_dist.data import build_datasets
args = json.loads(sys.argv[1])
train, _, _ = build_datasets(**args)
out = torch.stack([train[i]["tokens"] for i in range(16)])
gathered = [torch.zeros_like(out) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, out)
if dist.get_rank() == 0:
    torch.save(gathered, args["cache_dir"] + "/../gathered.pt")
# Both ranks done before either tears gloo down: a rank that destroys its group while its peer
# is still inside a collective can abort in gloo's teardown ("terminate called without an
# active exception", seen once in CI).
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_ranks_build_with_torch_distributed(shards, tmp_path):
    """Rank 0 builds the index caches, rank 1 loads them: both see the 1-process samples."""
    tok = load_tokenizer(spm_model())
    (tmp_path / "cache").mkdir()
    args = dict(
        paths=[str(shards / "A"), str(shards / "B")],
        weights=[0.5, 0.5],
        split="90,5,5",
        seq_length=S,
        n_future_tokens=N,
        seed=3,
        num_samples=(32, 4, 0),
        vocab_size=tok.vocab_size,
        cache_dir=str(tmp_path / "cache"),
    )
    (tmp_path / "rank.py").write_text(_RANK_SCRIPT)
    from mtp_dist.distributed import free_port

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node=2",
            f"--master-port={free_port()}",
            str(tmp_path / "rank.py"),
            json.dumps(args),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    gathered = torch.load(tmp_path / "gathered.pt")
    reference, _, _ = build_datasets(**{**args, "cache_dir": str(tmp_path / "c1")})
    expected = torch.stack([reference[i]["tokens"] for i in range(16)])
    assert torch.equal(gathered[0], expected) and torch.equal(gathered[1], expected)
