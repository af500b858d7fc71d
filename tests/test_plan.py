"""The planner (python -m mtp_dist.plan): the paper configs, exact parameter counts against the
model built on the meta device, per-stage FLOPs, memory terms against what autograd saves and
against DeepSpeed's estimators, the ranked layouts, refusals, and the fake-process-group dry
run at cluster size."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from mtp_dist import config
from mtp_dist.config import ModelConfig, ParallelConfig
from mtp_dist.model.costs import (
    even_split,
    largest_module_parameters,
    parameter_breakdown,
    pipeline_split,
    stage_costs,
)
from mtp_dist.model.model import build_model, flops_per_token
from mtp_dist.plan import layouts
from mtp_dist.plan.__main__ import main
from mtp_dist.plan.memory import layer_activations, model_states
from tests.support import ROOT

PAPER = sorted((ROOT / "configs" / "paper").glob("*.yaml"))
SIZES = ("0.3b", "0.6b", "1.3b", "3b", "7b", "13b")


def test_the_paper_configs_are_all_there_and_parameter_matched():
    names = {p.stem for p in PAPER}
    assert names == {f"{s}-n{n}" for s in SIZES for n in (1, 4)} | {"7b-byte-n8"}
    for size in SIZES:
        one, four = (config.load(ROOT / f"configs/paper/{size}-n{n}.yaml") for n in (1, 4))
        # n - 1 fewer trunk layers: the same depth, trunk + heads
        assert one.model.num_layers + 1 == four.model.num_layers + 4
        assert (one.model.vocab_size, one.model.seq_length) == (32000, 4096)
        assert one.train.global_batch_size * one.model.seq_length == 8 * 2**20
        ratio = parameter_breakdown(four.model)["total"] / parameter_breakdown(one.model)["total"]
        assert ratio == pytest.approx(1.0, abs=0.002)
    byte = config.load(ROOT / "configs/paper/7b-byte-n8.yaml")
    assert (byte.model.n_future_tokens, byte.model.seq_length, byte.data.tokenizer) == (
        8,
        8192,
        "byte",
    )


@pytest.mark.slow  # one process, about 20 s
def test_parameters_are_exact_at_every_layout_of_every_paper_config():
    """Each paper config parses, validates and builds on the meta device at every layout of
    the worker's list it accepts (at least two each), stage by stage on a fake process group;
    the planner's per-rank count equals the built stage's, and the stages add up to the
    planner's total."""
    proc = subprocess.run(
        [sys.executable, "tests/workers/plan_counts.py", *map(str, PAPER)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    built = json.loads(proc.stdout)
    assert set(built) == {p.stem for p in PAPER}
    for path in PAPER:
        m = config.load(path).model
        rows = built[path.stem]
        assert len({(r["tp"], r["pp"]) for r in rows}) >= 3, path.stem
        for r in rows:
            split = pipeline_split(m, ParallelConfig(r["tp"], r["pp"]))
            cost = stage_costs(m, r["tp"], split)[r["stage"]]
            assert r["params"] == cost.params_per_rank, (path.stem, r)
        for tp, pp in {(r["tp"], r["pp"]) for r in rows}:
            stages = stage_costs(m, tp, pipeline_split(m, ParallelConfig(tp, pp)))
            assert sum(s.params for s in stages) == parameter_breakdown(m)["total"]


def test_stage_flops_add_up_and_the_heads_are_on_the_last_stage():
    m = config.load(ROOT / "configs/paper/13b-n4.yaml").model
    stages = stage_costs(m, 8, even_split(m, 4))
    assert sum(s.flops_per_token for s in stages) == pytest.approx(flops_per_token(m), rel=1e-12)
    assert stages[0].flops_per_token == stages[1].flops_per_token == stages[2].flops_per_token
    unembeddings = 6 * m.hidden_size * m.padded_vocab_size * m.n_future_tokens
    assert stages[3].flops_per_token > stages[0].flops_per_token + unembeddings
    uneven = stage_costs(m, 8, (10, 10, 10, 6))  # a split a stage balancer might choose
    assert [s.trunk_layers for s in uneven] == [10, 10, 10, 6]
    assert sum(s.params for s in uneven) == parameter_breakdown(m)["total"]


def _saved_activation_bytes(model, layer, s, b, dtype) -> int:
    """Bytes of the tensors autograd saves in one layer's forward, parameters excluded."""
    x = torch.randn(s, b, model.config.hidden_size, dtype=dtype, requires_grad=True)
    mask, rope = model._positions(s, x.device)
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    skip |= {rope.untyped_storage().data_ptr(), mask.untyped_storage().data_ptr()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, attention_mask=mask, rotary_pos_emb=rope)
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("groups", [None, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("attention", ["sdpa", "megatron"])
def test_layer_activations_are_what_autograd_saves(megatron_1proc, dtype, groups, attention):
    """Exact, per core attention: megatron-core's keeps the s x s softmax, sdpa only its
    log-sum-exp (the s^2 term must be there for one and absent for the other)."""
    m = ModelConfig(
        attention=attention,
        n_future_tokens=1,
        num_layers=1,
        hidden_size=128,
        num_attention_heads=8,
        num_query_groups=groups,
        ffn_hidden_size=320,
        vocab_size=64,
        vocab_multiple=64,
        seq_length=48,
    )
    model = build_model(m, dtype=dtype)
    saved = _saved_activation_bytes(model, model.trunk.layers[0], m.seq_length, 3, dtype)
    assert layer_activations(m, 1, 3, dtype == torch.bfloat16) == saved
    softmax = 4 * m.num_attention_heads * m.seq_length**2 * 3
    longer = dataclasses.replace(m, seq_length=2 * m.seq_length)
    growth = layer_activations(longer, 1, 3, dtype == torch.bfloat16) - 2 * saved
    assert growth >= 2 * softmax if attention == "megatron" else growth < 0.01 * softmax


def test_model_states_agree_with_deepspeeds_estimators(megatron_1proc):
    """The same model (built for real on the CPU, so DeepSpeed's own model_to_params counts
    it) on 2 nodes of 8 GPUs, TP1 x PP1: ZeRO-2 equals DeepSpeed's estimate; ZeRO-3 is
    DeepSpeed's plus 2 bytes per parameter over N, the 16-bit parameter partition its ZeRO-3
    estimate leaves out (it reuses ZeRO-2's 18 bytes, where the 16-bit weights are counted
    whole, outside the 18)."""
    from deepspeed.runtime.zero.stage3 import (
        estimate_zero3_model_states_mem_needs,
        model_to_params,
    )
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    m = ModelConfig(n_future_tokens=4, num_layers=2, hidden_size=128, num_attention_heads=4)
    total, largest = model_to_params(build_model(m))
    assert total == parameter_breakdown(m)["total"]
    assert largest == largest_module_parameters(m)
    n = 16

    def planned(stage):
        return sum(t.bytes for t in model_states(total, n, "deepspeed", stage, True, largest))

    _, zero2 = estimate_zero2_model_states_mem_needs(total, 8, 2, cpu_offload=False)
    _, zero3, _ = estimate_zero3_model_states_mem_needs(
        total, largest, 8, 2, cpu_offload=False, cpu_offload_params=False
    )
    assert int(planned(2)) == zero2
    assert int(planned(3) - 2 * total / n) == zero3


def test_plan_json_has_exact_params_memory_and_ranked_layouts(capsys):
    assert main(["configs/paper/7b-n4.yaml", "--gpus", "64", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    m = config.load(ROOT / "configs/paper/7b-n4.yaml").model
    assert r["params"] == r["params"] | parameter_breakdown(m)
    assert r["layout"]["memory"][0]["terms"][0]["name"] == "weights"
    assert r["logits_gib"]["joint_all_heads"] > 3 * r["logits_gib"]["sequential_one_head"]
    assert set(r["model_states_peak_stage"]["per_engine"]) >= {"deepspeed ZeRO-3"}
    steps = [x["step_seconds"] for x in r["layouts"]]
    assert steps and steps == sorted(steps)
    budget = r["token_budget"]
    for x in r["layouts"]:
        assert x["tensor"] * x["pipeline"] * x["data"] == 64
        assert x["peak_gib"] <= 80
        # days is printed to 2 decimals: within half a hundredth of the budget's days.
        assert x["days"] == pytest.approx(budget / x["tokens_per_day"], abs=0.005)
    reasons = " ".join(x["reason"] for x in r["refused"])
    assert "exceeds the GPU's 80 GiB" in reasons
    # 28 trunk layers: PP8 is priced with the balanced split (auto), not refused.
    assert "not divisible by parallel.pipeline" not in reasons


def test_plan_text_names_each_terms_formula(capsys):
    assert main(["configs/paper/0.3b-n4.yaml", "--gpus", "8", "--top", "3"]) == 0
    out = capsys.readouterr().out
    for needle in ("Parameters (exact)", "fp32 gradient buffer", "4 a s b/t", "Layouts on 8"):
        assert needle in out
    assert "s^2" not in out  # sdpa, the default, keeps no s x s tensor
    args = ["configs/paper/0.3b-n4.yaml", "model.attention=megatron", "--gpus", "8", "--top", "3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "a s^2 b/t" in out and "reused buffer for the scores matmul" in out


@pytest.mark.parametrize(
    ("world", "overrides", "message"),
    [
        (
            64,
            ["parallel.pipeline=2", "parallel.pipeline_layers=even"],
            "model.num_layers=39 is not divisible by parallel.pipeline=2",
        ),
        (64, ["parallel.tensor=16"], "must divide the attention heads / query groups (40)"),
        (
            64,
            ["parallel.tensor=8", "model.vocab_size=32001", "model.vocab_multiple=100"],
            "the padded vocabulary 32100 is not divisible by parallel.tensor=8",
        ),
        (64, ["parallel.tensor=1", "parallel.pipeline=1"], "exceeds the GPU's 80 GiB"),
        (
            48,
            ["parallel.pipeline=3", "engine=deepspeed", "deepspeed.zero_stage=3"],
            "DeepSpeed supports pipelines with ZeRO-1 only",
        ),
    ],
)
def test_an_impossible_layout_is_refused_with_the_reason(capsys, world, overrides, message):
    argv = ["configs/paper/13b-n1.yaml", "--dry-run", "--world", str(world), *overrides]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def _dry_run(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "mtp_dist.plan", *args, "--dry-run", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)["dry_run"]


def test_dry_run_13b_tp8_pp4_on_64_ranks():
    r = _dry_run("configs/paper/13b-n4.yaml", "--world", "64", "parallel.tensor=8",
                 "parallel.pipeline=4")  # fmt: skip
    m = config.load(ROOT / "configs/paper/13b-n4.yaml").model
    assert (r["tensor"], r["pipeline"], r["data"]) == (8, 4, 2)
    assert len(r["positions"]) == 32
    assert r["total_params"] == parameter_breakdown(m)["total"]
    assert {p["rank"] for p in r["positions"] if p["pp_rank"] == 3} == set(range(48, 56))


@pytest.mark.slow  # two dry runs in their own processes, about 15 s
def test_dry_run_7b_tp4_pp2_on_16_ranks_and_zero3_partitions():
    r = _dry_run("configs/paper/7b-n4.yaml", "--world", "16", "parallel.tensor=4",
                 "parallel.pipeline=2")  # fmt: skip
    assert (r["tensor"], r["pipeline"], r["data"], len(r["positions"])) == (4, 2, 2, 8)
    z = _dry_run("configs/paper/7b-n4.yaml", "--world", "16", "parallel.tensor=4",
                 "parallel.pipeline=1", "engine=deepspeed", "deepspeed.zero_stage=3")  # fmt: skip
    m = config.load(ROOT / "configs/paper/7b-n4.yaml").model
    (per_rank,) = stage_costs(m, 4)
    (numel,), (padding,) = z["zero3"]["partition_numel_per_stage"], z["zero3"]["padding_per_stage"]
    assert z["zero3"]["dp"] == 4
    assert numel * 4 - padding == per_rank.params_per_rank
    tensors = 9 * (m.num_layers + m.n_future_tokens) + 3  # each pads by less than dp
    assert 0 <= padding < 4 * tensors


def test_help():
    proc = subprocess.run(
        [sys.executable, "-m", "mtp_dist.plan", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0 and "--dry-run" in proc.stdout


def test_hardware_and_layouts_are_checked_before_any_compute(capsys):
    assert main(["configs/paper/0.3b-n1.yaml", "--gpus", "0"]) == 2
    assert "--gpus=0 must be >= 1" in capsys.readouterr().err
    # The config's own layout does not divide 6 GPUs: said, and the layouts that do are ranked.
    assert main(["configs/paper/0.3b-n1.yaml", "--gpus", "6", "parallel.tensor=4", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert "does not divide the world size 6" in r["layout"]["refused"]
    assert r["layouts"] and all(x["tensor"] * x["pipeline"] * x["data"] == 6 for x in r["layouts"])
    for flag, value in (("--mfu", "5"), ("--mfu", "0"), ("--gpu-tflops", "inf"),
                        ("--gpu-memory", "nan"), ("--gpu-memory", "-80")):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            main(["configs/paper/0.3b-n1.yaml", flag, value])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"argument {flag}: {value} must be a finite number" in err


def test_candidates_cover_the_gpu_count():
    cfg = config.load(ROOT / "configs/paper/1.3b-n4.yaml")
    feasible, refused = layouts.candidates(cfg, layouts.Hardware(16))
    seen = {(p.run.tp, p.run.pp) for p in feasible}
    assert (1, 1) in seen and all(16 % (tp * pp) == 0 for tp, pp in seen)
    assert all(p.peak_bytes <= 80 * 2**30 for p in feasible)
    # 20 trunk layers over 16 stages: priced with the balanced split, one layer or more each.
    deep = [p for p in feasible if p.run.pp == 16]
    assert deep and all(min(s.trunk_layers for s in p.stages) >= 1 for p in deep)
    assert all(sum(s.trunk_layers for s in p.stages) == 20 for p in deep)


def _at(cfg, tp: int, pp: int, hw: layouts.Hardware) -> layouts.LayoutPlan:
    at = layouts.with_layout(cfg, tp, pp, 1, False)
    return layouts.plan(at, layouts.check(at, hw.gpus), hw)


def test_communication_orders_the_layouts_as_known():
    """Where the order is known: TP8 across a node boundary is slower than inside a node (its
    all-reduces at every layer take the slow link); TP1 is fastest where the model fits, and
    more tensor parallelism is slower at every step (more all-reduced bytes per token); data
    parallelism across nodes costs more than inside one. Every term is reported."""
    cfg = config.load(ROOT / "configs/paper/1.3b-n4.yaml")
    inside, across = (_at(cfg, 8, 1, layouts.Hardware(8, gpus_per_node=n)) for n in (8, 4))
    assert across.communication.tp_per_slot > 5 * inside.communication.tp_per_slot > 0
    assert across.step_seconds > inside.step_seconds
    hw = layouts.Hardware(8)
    steps = [_at(cfg, tp, 1, hw).step_seconds for tp in (1, 2, 4, 8)]
    assert steps == sorted(steps) and len(set(steps)) == 4, steps
    feasible, _ = layouts.candidates(cfg, hw)
    assert (feasible[0].run.tp, feasible[0].run.pp) == (1, 1)
    one_node, two = (_at(cfg, 1, 1, layouts.Hardware(16, gpus_per_node=n)) for n in (16, 8))
    assert two.communication.dp_per_step > one_node.communication.dp_per_step > 0
    slow = _at(cfg, 8, 1, layouts.Hardware(8, intra_node_gbs=30.0))  # a user's own bandwidth
    assert slow.communication.tp_per_slot == pytest.approx(10 * inside.communication.tp_per_slot)


def test_no_tensor_parallel_group_spans_two_nodes(capsys):
    feasible, _ = layouts.candidates(
        config.load(ROOT / "configs/paper/1.3b-n4.yaml"), layouts.Hardware(16, gpus_per_node=4)
    )
    assert feasible and max(p.run.tp for p in feasible) == 4
    args = ["configs/paper/1.3b-n4.yaml", "--gpus", "8", "--gpus-per-node", "4", "--json"]
    assert main(args) == 0
    r = json.loads(capsys.readouterr().out)
    assert {x["tensor"] for x in r["layouts"]} <= {1, 2, 4}
    terms = {"tp_per_microbatch", "pp_per_microbatch", "dp_per_step"}
    assert all(set(x["communication_seconds"]) == terms for x in r["layouts"])
