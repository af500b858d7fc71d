"""Overlapped gradient reduction with the sequential heads (train.overlap_grad_reduce,
train.overlap_param_gather, DeepSpeed's overlap_comm): the same losses, reduced gradients and
weights as without overlap, with several microbatches per rank, at DP2, TP2xDP2 and PP2xDP2
(the 1F1B schedule, which runs the last microbatch's forward under no_sync), for n=1 and n=4;
the heads' bucket is reduced once per step, and starts before the trunk's backward of the last
microbatch. Two launches of tests/workers/overlap_cases.py; the config checks run without.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from mtp_dist import config as C
from mtp_dist.run_plan import resolve
from tests.support import ROOT, torchrun

WORKER = ROOT / "tests" / "workers" / "overlap_cases.py"
RTOL = 1e-6
"""Losses and grad norms, overlap on vs off at one layout (measured: equal, or 4e-8 relative
for the grad norm, summed over other buckets)."""
GRAD_ATOL = 1e-7
"""Reduced gradients of magnitude ~1e-3..1e-1 (measured: equal)."""
BF16_RTOL = 1e-3
"""A bf16 run's losses against the fp32 run's, first 4 steps of the tiny n=4 model (bf16 has
8 mantissa bits; measured: 1.1e-5 relative, the loss being mostly ln V at the start)."""
WEIGHT_ATOL = 1e-6
"""Weights after an AdamW step, which moves a weight by up to ~lr = 1e-3: a different bucket
layout sums the clipping norm in another order (measured: up to 1e-7)."""

OFF = ["train.overlap_grad_reduce=false"]
GRAD = ["train.overlap_grad_reduce=true", "train.overlap_param_gather=false"]
BOTH = ["train.overlap_grad_reduce=true", "train.overlap_param_gather=true"]
ZERO2 = ["deepspeed.zero_stage=2"]


def _cases(prefix: str, layout: dict, ns=(1, 4)) -> list[dict]:
    cases = []
    for n in ns:
        cases.append({"name": f"{prefix}_n{n}_off", "n": n, **layout, "overrides": OFF})
        cases.append({"name": f"{prefix}_n{n}_on", "n": n, **layout, "overrides": GRAD})
    return cases


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("overlap")
    # First in the launch: torch warns of a dtype mismatch once per process.
    two = [
        {"name": f"{dtype}_{engine}", "n": 4, "engine": engine, "steps": 4,
         "overrides": OFF + [f"train.dtype={dtype}"] + (ZERO2 if engine == "deepspeed" else [])}
        for dtype in ("bf16", "fp32")
        for engine in ("megatron", "deepspeed")
    ]  # fmt: skip
    two += _cases("dp2", {})
    two.append({"name": "dp2_n4_gather", "n": 4, "overrides": BOTH})
    tied = ["model.tie_embeddings=true"]
    two.append({"name": "tied_n4_off", "n": 4, "overrides": OFF + tied})
    two.append({"name": "tied_n4_on", "n": 4, "overrides": BOTH + tied})
    ds = {"engine": "deepspeed"}
    two.append({"name": "ds_n4_off", "n": 4, **ds, "overrides": OFF + ZERO2})
    two.append({"name": "ds_n4_on", "n": 4, **ds, "overrides": GRAD[:1] + ZERO2})
    two.append({"name": "resume", "kind": "resume", "n": 4, "save": BOTH, "load": OFF})
    two.append({"name": "resume_back", "kind": "resume", "n": 4, "save": OFF, "load": BOTH})
    torchrun(2, WORKER, "--out", str(out), "--cases", json.dumps(two))
    four = _cases("tp2", {"tp": 2}) + _cases("pp2", {"pp": 2}, ns=(4,))
    torchrun(4, WORKER, "--out", str(out), "--cases", json.dumps(four))
    return lambda name: torch.load(out / f"{name}.pt")


def assert_same(on: dict, off: dict) -> None:
    for a, b in zip(on["rows"], off["rows"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=RTOL)
        assert a["heads"] == pytest.approx(b["heads"], rel=RTOL)
        # Every row is an optimizer step: its grad norm must be a finite number (None or
        # NaN would mean the engine lost it), and the two settings' norms agree.
        for norm in (a["grad_norm"], b["grad_norm"]):
            assert isinstance(norm, float) and math.isfinite(norm) and norm > 0, norm
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=RTOL)
    assert ("last_forward" in on) == ("last_forward" in off)
    if "last_forward" in off:
        a, b = on["last_forward"], off["last_forward"]
        assert a["loss"] == pytest.approx(b["loss"], rel=RTOL)
        assert a["heads"] == pytest.approx(b["heads"], rel=RTOL)
    for key, atol in (("grads", GRAD_ATOL), ("weights", WEIGHT_ATOL)):
        if key not in off:
            continue
        assert set(on[key]) == set(off[key])
        for name, t in on[key].items():
            diff = (t - off[key][name]).abs().max().item()
            assert diff <= atol, f"{key} {name} differs by {diff:.3g}"
    if "grads" in on:
        zero = [k for k, g in on["grads"].items() if not g.abs().sum() > 0]
        assert not zero, f"no gradient: {zero}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "on,off",
    [
        ("dp2_n1_on", "dp2_n1_off"),
        ("dp2_n4_on", "dp2_n4_off"),
        ("dp2_n4_gather", "dp2_n4_off"),
        ("tied_n4_on", "tied_n4_off"),
        ("tp2_n1_on", "tp2_n1_off"),
        ("tp2_n4_on", "tp2_n4_off"),
        ("pp2_n4_on", "pp2_n4_off"),
        ("ds_n4_on", "ds_n4_off"),
    ],
)
def test_overlap_gives_the_same_losses_gradients_and_weights(results, on, off):
    a, b = results(on), results(off)
    assert a["plan"][0] and not b["plan"][0]
    assert_same(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dp2_n1_on", "dp2_n4_on", "tp2_n4_on"])
def test_heads_bucket_reduces_once_before_the_trunk_backward(results, name):
    """The heads (and the unembedding) are the first bucket; in the second step, each
    bucket's reduction starts once, and the heads' starts before any trunk gradient of the
    last microbatch is ready: it overlaps the trunk's backward."""
    r = results(name)
    heads = r["buckets"][0]
    assert all(k.startswith(("heads.", "output_layer.")) for k in heads)
    every = {k for bucket in r["buckets"] for k in bucket}
    assert {k for k in every if k.startswith(("heads.", "output_layer."))} == set(heads)
    events = r["events"]
    starts = [e for e in events if e[0] == "start"]
    assert len(starts) == len(r["buckets"])
    first_trunk = events.index(("ready", False))
    assert events.index(("start", True)) < first_trunk
    # Every head's hooks fire in the last microbatch only: the unembedding and the final
    # norm once per head, every other heads' parameter once.
    n = int(name.split("_n")[1][0])
    assert events.count(("ready", True)) == len(heads) - 2 + 2 * n


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resume", "resume_back"])
def test_checkpoint_continues_exactly_across_bucket_layouts(results, name):
    """Several buckets (overlap on) against one (off), both ways: the optimizer state survives
    the fully-reshardable checkpoint (megatron-core drops the padding between buckets: see
    compat/megatron.keep_bucket_padding), and the step after the load gives the same weights."""
    r = results(name)
    for key, want in r["continued"].items():
        diff = (r["resumed"][key] - want).abs().max().item()
        assert diff <= WEIGHT_ATOL, f"{key} differs by {diff:.3g} after the resumed step"


@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["megatron", "deepspeed"])
def test_bf16_is_one_dtype_and_tracks_fp32(results, engine):
    """train.dtype=bf16: every parameter is bf16, norms included (no dtype-mismatch fallback,
    one gradient buffer, fp32 main parameters in the optimizer); losses track fp32's."""
    bf16, fp32 = results(f"bf16_{engine}"), results(f"fp32_{engine}")
    assert bf16["param_dtypes"] == ["torch.bfloat16"] and fp32["param_dtypes"] == ["torch.float32"]
    assert bf16["dtype_warnings"] == []
    if engine == "megatron":
        assert bf16["grad_buffers"] == [["torch.bfloat16", "torch.float32"]]
        assert bf16["main_param_dtypes"] == ["torch.float32"]
    # Four steps' losses: the megatron cases' fourth is a forward-backward without a step.
    every = [r["rows"] + ([r["last_forward"]] if "last_forward" in r else []) for r in (bf16, fp32)]
    assert len(every[0]) == len(every[1]) == 4
    for a, b in zip(*every, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=BF16_RTOL)
        assert a["heads"] == pytest.approx(b["heads"], rel=BF16_RTOL)
        assert a["loss"] != b["loss"]  # really bf16


def test_param_gather_resolves_on_with_the_grad_overlap(results):
    assert results("dp2_n4_gather")["plan"] == [True, True]
    assert results("ds_n4_on")["plan"] == [True, False]


def _cfg(*overrides: str) -> C.Config:
    return C.load(ROOT / "configs" / "tiny.yaml", list(overrides))


def test_defaults_are_on_on_gpu_off_on_cpu():
    cfg = _cfg()
    gpu, cpu = resolve(cfg, 2, on_gpu=True), resolve(cfg, 2, on_gpu=False)
    assert (gpu.overlap_grad_reduce, gpu.overlap_param_gather) == (True, True)
    assert (cpu.overlap_grad_reduce, cpu.overlap_param_gather) == (False, False)
    ds = resolve(_cfg("engine=deepspeed"), 2, on_gpu=True)
    assert (ds.overlap_grad_reduce, ds.overlap_param_gather) == (True, False)
    off = resolve(_cfg("train.overlap_param_gather=false"), 2, on_gpu=True)
    assert (off.overlap_grad_reduce, off.overlap_param_gather) == (True, False)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["engine=deepspeed", "train.overlap_param_gather=true"], "needs megatron's distributed"),
        (
            ["train.overlap_grad_reduce=false", "train.overlap_param_gather=true"],
            "set train.overlap_grad_reduce=true or train.overlap_param_gather=false",
        ),
    ],
)
def test_invalid_combinations_are_refused(overrides, message):
    with pytest.raises(C.ConfigError, match=message):
        _cfg(*overrides)


def test_param_gather_without_grad_overlap_on_cpu_is_refused():
    cfg = _cfg("train.overlap_param_gather=true")
    resolve(cfg, 2, on_gpu=True)
    with pytest.raises(C.ConfigError, match="off by default without a GPU"):
        resolve(cfg, 2, on_gpu=False)


def test_deepspeed_overlap_comm_follows_the_plan(tmp_path):
    from mtp_dist.engines.deepspeed.ds_config import build_ds_config

    cfg = _cfg("engine=deepspeed", "deepspeed.zero_stage=2")
    for on_gpu in (True, False):
        ds = build_ds_config(cfg, resolve(cfg, 2, on_gpu=on_gpu), on_gpu=on_gpu)
        assert ds["zero_optimization"]["overlap_comm"] is on_gpu
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"overlap_comm": True}}))
    cfg = _cfg("engine=deepspeed", f"deepspeed.config={path}", "train.overlap_grad_reduce=false")
    with pytest.raises(C.ConfigError, match="overlap_comm=true contradicts"):
        build_ds_config(cfg, resolve(cfg, 2, on_gpu=False), on_gpu=False)
    cfg = _cfg("engine=deepspeed", f"deepspeed.config={path}")
    ds = build_ds_config(cfg, resolve(cfg, 2, on_gpu=False), on_gpu=False)
    assert ds["zero_optimization"]["overlap_comm"] is True
