"""The order of real training and validation samples does not depend on how long the run is:
runs planned for different train.steps draw the same first samples, past the end of an epoch
too (a run can be extended on resume). Later epochs are permutations of their own; the DP union
and resume-by-count guarantees hold across epoch boundaries."""

from __future__ import annotations

import pytest
import torch
from test_data_prep_formats import tokenize, write_jsonl
from test_data_prep_support import stdlib_docs

from mtp_dist import config as config_mod
from mtp_dist.data import build_datasets, microbatches
from mtp_dist.data.sampler import sample_index
from mtp_dist.run_plan import resolve

SEED = 1234


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two directories (2 shards, 1 shard) of short documents: epochs of a few hundred samples."""
    root = tmp_path_factory.mktemp("order")
    docs = [d[:600] for d in stdlib_docs(60)]
    for i in range(2):
        write_jsonl(root / f"a{i}.jsonl", docs[20 * i : 20 * i + 20])
    write_jsonl(root / "b.jsonl", docs[40:])
    tokenize([root / "a*.jsonl"], root / "A", tokenizer="byte")
    tokenize([root / "b.jsonl"], root / "B", tokenizer="byte")
    return root


def planned(data, steps: int):
    """The datasets a run of `steps` steps builds, as train.py builds them."""
    cfg = config_mod.load(
        "configs/tiny.yaml",
        [
            "data.synthetic=false", f"data.paths=[{data / 'A'},{data / 'B'}]",
            "data.weights=[0.7,0.3]", "data.split=90,10,0", "model.vocab_size=259",
            "model.seq_length=32", f"train.steps={steps}", "train.eval_interval=5",
        ],
    )  # fmt: skip
    plan = resolve(cfg, world_size=1, on_gpu=False)
    train, valid, _ = build_datasets(
        cfg.data.paths, cfg.data.weights, cfg.data.split, cfg.model.seq_length,
        cfg.model.n_future_tokens, cfg.train.seed, (plan.train_samples, plan.eval_samples, 0),
        cfg.model.vocab_size, cache_dir=str(data / f"cache-{steps}"),
    )  # fmt: skip
    return plan, train, valid


def drawn(dataset, count: int, consumed: int = 0, dp: int = 1) -> torch.Tensor:
    """The first `count` samples the run draws (global batch 8, micro batch 2), over dp ranks."""
    ranks = [microbatches(dataset, 2, 8, r, dp, consumed, seed=SEED) for r in range(dp)]
    out = []
    while len(out) < count:
        for rank in ranks:
            for _ in range(4 // dp):
                out += list(next(rank)["tokens"])
    return torch.stack(out[:count])


def test_the_first_samples_do_not_depend_on_train_steps(data):
    short_plan, short, short_valid = planned(data, 2)
    long_plan, long, long_valid = planned(data, 5000)
    assert short_plan.train_samples < len(short) < long_plan.train_samples
    assert len(short) == len(long) and len(short_valid) == len(long_valid)
    k = 2 * len(short) + 16  # into the third epoch
    assert torch.equal(drawn(short, k), drawn(long, k))
    k = 3 * len(short_valid) + 4
    assert torch.equal(drawn(short_valid, k), drawn(long_valid, k))
    # Past the first epoch the samples come again, in another order.
    n = len(short)
    first, second = drawn(short, n), drawn(short, 2 * n)[n:]
    assert not torch.equal(first, second)
    assert sorted(map(tuple, first.tolist())) == sorted(map(tuple, second.tolist()))


@pytest.mark.parametrize("size", [1, 2, 7, 64, 1000])
def test_every_epoch_is_a_seeded_permutation(size):
    epochs = [[sample_index(e * size + i, size, SEED) for i in range(size)] for e in range(4)]
    assert epochs[0] == list(range(size))
    for order in epochs:
        assert sorted(order) == list(range(size))
    if size > 2:
        assert len({tuple(o) for o in epochs}) == 4
        other = [sample_index(size + i, size, SEED + 1) for i in range(size)]
        assert other != epochs[1]


def test_dp_union_and_resume_across_an_epoch_boundary(data):
    _, train, _ = planned(data, 2)
    start = len(train) - 12  # 1.5 global batches before the end of the first epoch
    single = drawn(train, 48, consumed=start)
    assert torch.equal(drawn(train, 48, consumed=start, dp=2), single)
    assert torch.equal(drawn(train, 40, consumed=start + 8), single[8:])
    expected = [train[sample_index(start + j, len(train), SEED)]["tokens"] for j in range(48)]
    assert torch.equal(single, torch.stack(expected))


def test_synthetic_data_wraps_too():
    train, _, _ = build_datasets(None, None, "98,1,1", 16, 2, 1, (8, 0, 0), 300, synthetic=True)
    samples = drawn(train, 16, consumed=len(train) - 8)  # megatron's mock epoch is long
    assert samples.shape == (16, 18) and int(samples.max()) < 300
    assert torch.equal(samples[8:], drawn(train, 8, consumed=len(train)))
