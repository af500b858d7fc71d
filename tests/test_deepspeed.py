"""DeepSpeed engine on CPU/gloo: ZeRO-1/2/3, TP and PP layouts reproduce the single-process run,
ZeRO-3 builds the model partitioned with the same initial weights, exact resume, universal
checkpoints across data-parallel sizes, and the checkpoint tools. Config-time checks:
tests/test_deepspeed_config.py.

Four launches of tests/workers/deepspeed_cases.py (tiny model, n=4, 4 steps of the same global
batches; step 0 has lr 0, steps 1-3 update) feed every equivalence test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtp_dist import config as C
from tests.support import ROOT, torchrun

WORKER = ROOT / "tests" / "workers" / "deepspeed_cases.py"
RTOL = 1e-5
"""Losses/grad norms of other layouts vs the 1-rank run: float32 reduction order only."""
BF16_RTOL = 2.0**-8
"""bf16 runs of two ZeRO stages after a clipped update: one bf16 unit in the last place (8 bits
of mantissa). The stages sum the global grad norm in different fp32 groupings (1e-8..7e-8
apart); clipping scales the update by 1 / that norm, so the fp32 master weights differ at the
1e-8 level, and a weight that close to a bf16 rounding boundary is cast to the neighbouring bf16
value: each such one-ulp flip moves the next losses and norms (measured: 1e-5 at step 2, 5e-5
at step 3, deepspeed 0.19.1 to 0.19.8 alike to the last digit, on one rank as on two). Without
clipping the losses are equal bit for bit (tested below). A real partitioning error moves
them by far more than 2^-8."""


BF16_NOCLIP = ["train.dtype=bf16", "train.grad_clip=0"]


def _launch(nproc: int, out: Path, cases: list[dict]) -> None:
    torchrun(nproc, WORKER, "--out", str(out), "--cases", json.dumps(cases))


def _to_universal(src: Path, dst: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mtp_dist.engines.deepspeed", "to-universal", str(src), str(dst)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("ds_out")
    ck = tmp_path_factory.mktemp("ds_ckpt")
    saved = {s: ck / f"zero{s}" / "step_2" for s in (1, 2, 3)}
    two = [
        {"name": f"zero{s}", "stage": s, "save": str(saved[s]), "save_after": 2} for s in (1, 2, 3)
    ]
    two += [
        {"name": "pp2_zero1", "stage": 1, "pp": 2, "eval": True},
        {"name": "zero2_nan", "stage": 2, "nan_at": 1},
        {"name": "zero3_recompute", "stage": 3, "recompute": True},
        *({"name": f"zero{s}_bf16", "stage": s, "overrides": ["train.dtype=bf16"]} for s in (2, 3)),
        *(
            {"name": f"zero{s}_bf16_noclip", "stage": s, "overrides": [*BF16_NOCLIP]}
            for s in (2, 3)
        ),
        *(
            {
                "name": f"zero{s}_heads",
                "stage": s,
                "overrides": ["train.trainable=heads"],
                "frozen": True,
                "save": str(ck / f"heads{s}"),
                "save_after": 4,
            }
            for s in (1, 3)
        ),  # fmt: skip
        {
            "name": "zero2_json",
            "stage": 2,
            "overrides": ["deepspeed.config=configs/deepspeed/zero2.json"],
        },
    ]
    _launch(2, out, two)
    _launch(4, out, [{"name": f"tp2dp2_zero{s}", "stage": s, "tp": 2} for s in (1, 2, 3)])
    _launch(
        2,
        out,
        [{"name": f"resume{s}", "stage": s, "load": str(saved[s]), "start": 2} for s in (1, 2, 3)],
    )
    one = [{"name": "ref", "stage": 1, "eval": True}]
    for s in (1, 3):
        _to_universal(saved[s], ck / f"universal{s}")
        one.append(
            {"name": f"universal{s}", "stage": s, "load": str(ck / f"universal{s}"), "start": 2}
        )
    _launch(1, out, one)
    result = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    result["_ckpt"] = ck
    return result


def _steps(rows: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in rows if "step" in r}


def _assert_close(rows: list[dict], ref: list[dict], rtol: float = RTOL) -> None:
    ref_steps = _steps(ref)
    got = _steps(rows)
    assert got, "no steps recorded"
    for step, r in got.items():
        e = ref_steps[step]
        assert r["loss"] == pytest.approx(e["loss"], rel=rtol), step
        assert r["heads"] == pytest.approx(e["heads"], rel=rtol), step
        assert r["grad_norm"] == pytest.approx(e["grad_norm"], rel=rtol), step
        assert r["lr"] == pytest.approx(e["lr"], rel=1e-12), step
        assert not r["skipped"]


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.slow
def test_zero_stage_on_two_ranks_matches_one_rank(runs, stage):
    _assert_close(runs[f"zero{stage}"], runs["ref"])
    assert len(_steps(runs["ref"])) == 4
    # The run learns: the last step's loss is below the first's.
    ref = _steps(runs["ref"])
    assert ref[3]["loss"] < ref[0]["loss"]


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.slow
def test_tp2_dp2_matches_tp1(runs, stage):
    _assert_close(runs[f"tp2dp2_zero{stage}"], runs["ref"])


def _construction(runs, name: str) -> tuple[list[dict], dict]:
    (first,) = [r for r in runs[name] if "construction" in r]
    return first["construction"], first


@pytest.mark.parametrize(
    "name", ["zero3", "zero3_recompute", "zero3_bf16", "tp2dp2_zero3", "resume3"]
)
@pytest.mark.slow
def test_zero3_model_is_partitioned_as_it_is_built(runs, name):
    """Right after engines.build_model (zero.Init) no parameter holds data and each rank holds
    its 1/dp partition of every parameter (rounded up), never the whole model."""
    held, _ = _construction(runs, name)
    dp = 2  # 2 ranks at TP1, 4 at TP2
    for rank in held:
        assert rank["materialised"] == 0
        assert rank["full"] <= rank["held"] * dp < rank["full"] + dp * rank["count"]
    # The unpartitioned path holds the whole TP-local model on every rank.
    for rank in _construction(runs, "zero2")[0]:
        assert rank["held"] == rank["materialised"] == rank["full"]


@pytest.mark.slow
def test_initial_weights_are_those_of_the_whole_build(runs):
    """Every case's engine-built model (partitioned or not, TP1 or TP2) starts from exactly
    weights.init_weights' values."""
    cases = [k for k in runs if not k.startswith("_")]
    assert {"zero3", "tp2dp2_zero3", "universal3"} <= set(cases)
    assert all(_construction(runs, name)[1]["init_equal"] for name in cases)


@pytest.mark.slow
def test_zero3_decays_the_same_parameters(runs):
    """Partitioned parameters are empty placeholders (p.shape is [0]): the engine groups them
    by their own shapes, like the whole build; by p.shape nothing would be decayed."""
    groups = _construction(runs, "zero3")[1]["groups"]
    assert groups["engine"] == groups["whole"] and groups["whole"][0] > 0
    assert groups["shape"][0] == 0


@pytest.mark.slow
def test_zero3_bf16_model_is_the_unpartitioned_one(runs):
    """bf16: every parameter (megatron-core builds the norm gains in torch's default dtype)
    is bf16 as after deepspeed.initialize's cast in the unpartitioned path, and the first
    forward, before any update, gives exactly ZeRO-2's loss (inv_freq stays float32), and
    training goes on alike."""
    for name in ("zero2_bf16", "zero3_bf16"):
        assert _construction(runs, name)[1]["dtypes"] == ["torch.bfloat16"]
    zero2, zero3 = _steps(runs["zero2_bf16"]), _steps(runs["zero3_bf16"])
    assert zero3[0]["loss"] == zero2[0]["loss"] and zero3[0]["heads"] == zero2[0]["heads"]
    # Before any update only the fp32 summation order of the norm differs.
    assert zero3[0]["grad_norm"] == pytest.approx(zero2[0]["grad_norm"], rel=1e-6)
    _assert_close(runs["zero3_bf16"], runs["zero2_bf16"], rtol=BF16_RTOL)
    # Without clipping only the grad norm's fp32 order of sums differs, and it reaches no
    # weight: the losses stay equal, bit for bit (measured norms: within 7.4e-8).
    zero2, zero3 = _steps(runs["zero2_bf16_noclip"]), _steps(runs["zero3_bf16_noclip"])
    assert len(zero3) == len(zero2) == 4
    for step, r in zero3.items():
        assert (r["loss"], r["heads"]) == (zero2[step]["loss"], zero2[step]["heads"]), step
        assert r["grad_norm"] == pytest.approx(zero2[step]["grad_norm"], rel=1e-6), step


@pytest.mark.slow
def test_pipeline_zero1_matches_single_stage(runs):
    _assert_close(runs["pp2_zero1"], runs["ref"])
    (ev,) = [r["eval"] for r in runs["pp2_zero1"] if "eval" in r]
    (ref_ev,) = [r["eval"] for r in runs["ref"] if "eval" in r]
    assert ev == pytest.approx(ref_ev, rel=RTOL)
    assert len(ev) == 1 + 2 * 4  # loss, 4 head losses, 4 head accuracies


@pytest.mark.slow
def test_recompute_matches(runs):
    _assert_close(runs["zero3_recompute"], runs["ref"])


@pytest.mark.slow
def test_json_config_matches(runs):
    _assert_close(runs["zero2_json"], runs["ref"])


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.slow
def test_exact_resume(runs, stage):
    before = _steps(runs[f"zero{stage}"])
    after = _steps(runs[f"resume{stage}"])
    assert sorted(after) == [2, 3]
    for step in (2, 3):
        for key in ("loss", "heads", "grad_norm", "lr"):
            assert after[step][key] == before[step][key], (step, key)


@pytest.mark.parametrize("stage", [1, 3])
@pytest.mark.slow
def test_universal_checkpoint_from_two_ranks_on_one(runs, stage):
    rows = runs[f"universal{stage}"]
    assert sorted(_steps(rows)) == [2, 3]
    _assert_close(rows, runs[f"zero{stage}"])


@pytest.mark.slow
def test_checkpoint_stays_inside_its_directory(runs):
    ck = runs["_ckpt"]
    for s in (1, 2, 3):
        assert sorted(os.listdir(ck / f"zero{s}")) == ["step_2"]
        assert "deepspeed" in os.listdir(ck / f"zero{s}" / "step_2")


@pytest.mark.slow
def test_nonfinite_step_is_skipped(runs):
    rows = _steps(runs["zero2_nan"])
    assert rows[1]["skipped"] and rows[1]["unchanged"]
    assert not rows[2]["skipped"]
    # The skipped step advanced the schedule like any other: every step's lr is the one of
    # the run without the bad step.
    lrs = {name: [r["lr"] for r in _steps(runs[name]).values()] for name in ("zero2_nan", "zero2")}
    assert lrs["zero2_nan"] == lrs["zero2"]


def _cfg(*overrides: str) -> C.Config:
    return C.load(ROOT / "configs" / "tiny.yaml", ["engine=deepspeed", *overrides])


def test_warmup_cosine_schedule():
    from mtp_dist.engines.optim import WarmupCosine

    # LambdaLR passes k-1 for optimizer step k; step k runs at the schedule's value for k.
    f = WarmupCosine(warmup=2, decay=10, min_ratio=0.1)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(5) == pytest.approx(0.55)
    assert f(9) == pytest.approx(0.1) and f(50) == 0.1


def test_apply_deepspeed_skips_shm_build():
    import importlib

    from mtp_dist.compat import cpu

    cpu.apply_deepspeed()
    cpu.apply_deepspeed()  # idempotent
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    assert ds_torch.build_shm_op() is None
    assert os.environ["DS_ACCELERATOR"] == "cpu"


@pytest.mark.slow
def test_cli_help():
    for args in ([], ["to-universal"]):
        proc = subprocess.run(
            [sys.executable, "-m", "mtp_dist.engines.deepspeed", *args, "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert "to-universal" in proc.stdout or "checkpoint_dir" in proc.stdout


@pytest.mark.slow
def test_cli_rejects_missing_checkpoint(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtp_dist.engines.deepspeed",
            "to-universal",
            str(tmp_path / "x"),
            str(tmp_path / "y"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ")
    assert "is not a directory with a DeepSpeed" in proc.stderr


@pytest.mark.slow
def test_export_weights_agree_across_stages(runs, megatron_1proc):
    """load_model_weights (the consolidated export's reader) gives the same full weights from
    the ZeRO-1, -2 and -3 checkpoints of the same run."""
    import torch

    from mtp_dist.engines.deepspeed.checkpoint import load_model_weights
    from mtp_dist.model.model import build_model
    from mtp_dist.model.weights import full_state

    states = []
    for s in (1, 2, 3):
        model = build_model(_cfg().model)
        load_model_weights(model, runs["_ckpt"] / f"zero{s}" / "step_2")
        states.append(full_state(model))
    for other in states[1:]:
        assert sorted(other) == sorted(states[0])
        for k, v in states[0].items():
            # Adam divides by sqrt(exp_avg_sq): gradients that differ by rounding between ZeRO
            # stages move a near-zero-gradient weight by up to ~1e-5 after two steps.
            torch.testing.assert_close(other[k], v, rtol=0, atol=3e-5)


@pytest.mark.parametrize("stage", [1, 3])
@pytest.mark.slow
def test_heads_only_trains_heads_2_to_n_alone(runs, stage):
    """train.trainable=heads on two ranks: the first step's losses are the full run's (same
    weights, same batch); after four steps and a save only heads 2..4 moved, in the model and
    in the checkpoint's full weights; Adam holds state for them alone."""
    rows = runs[f"zero{stage}_heads"]
    first, ref = _steps(rows)[0], _steps(runs["ref"])[0]
    assert first["heads"] == pytest.approx(ref["heads"], rel=RTOL)
    (frozen,) = [r["frozen"] for r in rows if "frozen" in r]
    extra = frozen["moved_live"]
    assert extra and frozen["trained"] == extra == frozen["moved_saved"]
    assert all(
        k.startswith(("heads.layers.1.", "heads.layers.2.", "heads.layers.3.")) for k in extra
    )
    assert frozen["saved_equals_live"]
    assert frozen["trained_elements"] <= frozen["adam_elements"]
    assert frozen["adam_elements"] <= 1.01 * frozen["trained_elements"] < frozen["all_elements"]
