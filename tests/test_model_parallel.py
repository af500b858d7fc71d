"""Equivalence of the MTP model across TP x PP layouts, head modes, and a plain GPTModel.

Two launches: one process for the references (core attention sdpa, and megatron-core's own
as the reference for it), four processes for every layout (TP1xPP1 with
DP4, TP2xPP1 and TP1xPP2 with DP2, TP2xPP2), each running a global batch of 8 in microbatches
of 2 through megatron-core's schedule. fp32 on CPU.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.support import ROOT, torchrun

pytestmark = pytest.mark.slow  # torchrun / subprocess trainings

WORKER = ROOT / "tests" / "workers" / "model_cases.py"
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
NS = (1, 2, 4)
LOSS_RTOL = 1e-6  # relative, on a loss of ~5-15
GRAD_ATOL = 1e-6  # absolute, on gradients of magnitude ~1e-2 (measured differences ~3e-8)
ATTENTION_RTOL = 1e-5  # sdpa against megatron-core's attention: other kernels, other rounding


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("model_cases")
    refs = [
        {"name": f"ref_n{n}_{m}", "tp": 1, "pp": 1, "n": n, "mode": m}
        for n in NS
        for m in ("sequential", "joint")
    ]
    refs += [
        {"name": f"ref_n{n}_{m}_megatron", "tp": 1, "pp": 1, "n": n, "mode": m,
         "attention": "megatron"}
        for n in (1, 4)
        for m in ("sequential", "joint")
    ]  # fmt: skip
    refs.append({"name": "gpt", "kind": "gpt"})
    refs.append({"name": "ref_n4_detached", "tp": 1, "pp": 1, "n": 4, "mode": "sequential",
                 "trainable": "detached"})  # fmt: skip
    refs.append({"name": "mask_ref", "tp": 1, "pp": 1, "n": 4, "mode": "sequential", "extra": 1})
    torchrun(1, WORKER, "--out", str(out), "--cases", json.dumps(refs))
    cases = [
        {"name": f"tp{tp}pp{pp}_n{n}", "tp": tp, "pp": pp, "n": n, "mode": "sequential"}
        for n in NS
        for tp, pp in LAYOUTS
    ]
    cases.append({"name": "tp2pp2_n4_joint", "tp": 2, "pp": 2, "n": 4, "mode": "joint"})
    cases.append(
        {"name": "tp2pp2_n4_megatron", "tp": 2, "pp": 2, "n": 4, "mode": "sequential",
         "attention": "megatron"}
    )  # fmt: skip
    cases.append(
        {"name": "tp2pp2_mask", "tp": 2, "pp": 2, "n": 4, "mode": "sequential", "extra": 1}
    )
    cases += [
        {"name": "tp2pp2_n4_detached", "tp": 2, "pp": 2, "n": 4, "mode": "sequential",
         "trainable": "detached"},
        {"name": "tp2pp1_n4_heads", "tp": 2, "pp": 1, "n": 4, "mode": "sequential",
         "trainable": "heads"},
    ]  # fmt: skip
    torchrun(4, WORKER, "--out", str(out), "--cases", json.dumps(cases))
    return lambda name: torch.load(out / f"{name}.pt")


def assert_same(a: dict, b: dict, rtol: float | None = None) -> None:
    """Same losses and gradients: to LOSS_RTOL and GRAD_ATOL, or with rtol all relative (a
    gradient tensor to rtol of its largest entry)."""
    loss_rtol = rtol or LOSS_RTOL
    assert a["loss"] == pytest.approx(b["loss"], rel=loss_rtol)
    if "head_losses" in a and "head_losses" in b:
        assert a["head_losses"] == pytest.approx(b["head_losses"], rel=loss_rtol)
    assert set(a["grads"]) == set(b["grads"])
    for name, g in a["grads"].items():
        diff = (g - b["grads"][name]).abs().max().item()
        bound = GRAD_ATOL if rtol is None else rtol * b["grads"][name].abs().max().item()
        assert diff <= bound, f"{name}: gradient differs by {diff:.3g}"
    nonzero = sum(g.abs().sum().item() > 0 for g in a["grads"].values())
    assert nonzero == len(a["grads"]), "every parameter should receive a gradient"


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_layout_matches_single_process(results, tp, pp, n):
    assert_same(results(f"tp{tp}pp{pp}_n{n}"), results(f"ref_n{n}_sequential"))


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_layer_numbers_run_over_the_stages_then_the_heads(results, tp, pp, n):
    """Each stage numbers its layers on from the previous stage's; the heads, on the last
    stage, follow the last trunk layer: 1..num_layers + n, each once."""
    per_stage = results(f"tp{tp}pp{pp}_n{n}")["layer_numbers"]
    assert len(per_stage) == pp
    assert sum(per_stage, []) == list(range(1, 4 + n + 1))  # the worker's trunk: 4 layers


@pytest.mark.parametrize("n", NS)
def test_sequential_equals_joint(results, n):
    assert_same(results(f"ref_n{n}_sequential"), results(f"ref_n{n}_joint"))


def test_sequential_equals_joint_under_tp2_pp2(results):
    assert_same(results("tp2pp2_n4_joint"), results("ref_n4_joint"))


@pytest.mark.parametrize("mode", ["sequential", "joint"])
@pytest.mark.parametrize("n", [1, 4])
def test_sdpa_equals_megatron_attention(results, n, mode):
    """model.attention=sdpa (the default, every case above) against megatron-core's own
    attention, grouped-query, one process."""
    assert_same(results(f"ref_n{n}_{mode}"), results(f"ref_n{n}_{mode}_megatron"), ATTENTION_RTOL)


@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_sdpa_layouts_equal_megatron_attention(results, tp, pp):
    """TP2 and PP2 with sdpa (heads split over the tensor-parallel ranks) against megatron-core's
    attention, single-process and at TP2xPP2."""
    assert_same(results(f"tp{tp}pp{pp}_n4"), results("ref_n4_sequential_megatron"), ATTENTION_RTOL)
    if (tp, pp) == (2, 2):
        assert_same(results("tp2pp2_n4"), results("tp2pp2_n4_megatron"), ATTENTION_RTOL)


def test_n1_equals_plain_gpt_model(results):
    assert_same(results("gpt"), results("ref_n1_sequential"))


def test_masked_tail_matches_across_layouts(results):
    """With only seq_length+1 tokens, heads 2..4 lose their last positions; the masked loss
    and gradients still agree between layouts."""
    assert_same(results("tp2pp2_mask"), results("mask_ref"))


def test_heads_have_distinct_losses(results):
    r = results("ref_n4_sequential")
    assert len(set(round(x, 6) for x in r["head_losses"])) == 4
    weights = [1.0, 0.5, 0.25, 2.0]
    assert r["loss"] == pytest.approx(
        sum(w * x for w, x in zip(weights, r["head_losses"], strict=True))
    )


def test_detached_heads_across_layouts(results):
    """train.trainable=detached at TP2xPP2 (the trunk's gradient crosses the stages) equals one
    process; there, heads 2..4's losses reach the heads as in the normal run but not the trunk
    (that it equals n=1 with the same weights: tests/test_heads.py)."""
    got, ref, normal = (
        results("tp2pp2_n4_detached"),
        results("ref_n4_detached"),
        results("ref_n4_sequential"),
    )
    assert_same(got, ref)
    assert ref["head_losses"] == normal["head_losses"]
    for name, g in ref["grads"].items():
        same = torch.allclose(g, normal["grads"][name], rtol=0, atol=GRAD_ATOL)
        assert same != name.startswith(("embedding.", "trunk.")), name


def test_heads_only_under_tp2_dp2(results):
    """train.trainable=heads at TP2 x DP2: the same losses as training everything, heads 2..4's
    gradients equal the normal run's, and nothing else gets one."""
    got, ref = results("tp2pp1_n4_heads"), results("ref_n4_sequential")
    assert got["loss"] == pytest.approx(ref["loss"], rel=LOSS_RTOL)
    assert got["head_losses"] == pytest.approx(ref["head_losses"], rel=LOSS_RTOL)
    extra = ("heads.layers.1.", "heads.layers.2.", "heads.layers.3.")
    assert any(name.startswith(extra) for name in got["grads"])
    for name, g in got["grads"].items():
        if name.startswith(extra):
            assert (g - ref["grads"][name]).abs().max().item() <= GRAD_ATOL, name
        else:
            assert not g.any(), f"{name} is frozen but got a gradient"
