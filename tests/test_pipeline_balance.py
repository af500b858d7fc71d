"""parallel.pipeline_layers: the split of the trunk over pipeline stages (auto, even, a list).

The balanced split is checked against splits worked out by hand from the rule it states; an
uneven split trains like one process (torchrun, gloo), and a checkpoint reshards across splits
and into one process with the same losses afterwards."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest

from mtp_dist import config
from mtp_dist.config import ConfigError, ParallelConfig
from mtp_dist.model.costs import balanced_split, pipeline_split, stage_costs
from mtp_dist.model.spec import pipeline_layout
from mtp_dist.plan import layouts
from tests.support import ROOT
from tests.test_trainer import RESHARD_RTOL, env, losses, steps_logged_since, train

FOUR_LAYERS = ["model.num_layers=4", "train.steps=4"]


def tiny(*overrides: str) -> config.Config:
    return config.load(ROOT / "configs/tiny.yaml", ["model.num_layers=4", *overrides])


def flops(cfg: config.Config, split) -> list[float]:
    return [s.flops_per_token for s in stage_costs(cfg.model, 1, split)]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parallel.pipeline_layers=[3,2]"], "places 5 trunk layers but model.num_layers=4"),
        (["parallel.pipeline_layers=[4,0]"], "has a stage without trunk layers"),
        (["parallel.pipeline_layers=[1,1,2]"], "has 3 entries but parallel.pipeline=2"),
        (["parallel.pipeline=3", "parallel.pipeline_layers=even"], "not divisible by"),
        (["parallel.pipeline=5"], "fewer than parallel.pipeline=5"),
        (["parallel.pipeline_layers=balanced"], "is not one of auto, even"),
    ],
)
def test_bad_pipeline_layers_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match="pipeline") as e:
        tiny("parallel.pipeline=2", *overrides)
    assert message in str(e.value)


def _check(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mtp_dist.train", "--config", "configs/tiny.yaml", "--check",
         "--world-size", "2", "model.num_layers=4", "parallel.pipeline=2", *overrides],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_train_check_prints_the_split_and_refuses_a_bad_one():
    ok = _check()
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "pipeline: trunk layers per stage [3, 1] (parallel.pipeline_layers=auto)" in ok.stdout
    bad = _check("parallel.pipeline_layers=[1,2]")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "error: parallel.pipeline_layers=[1, 2] places 3 trunk layers but model.num_layers=4: "
        "make the counts sum to it (or use auto)"
    ]


def test_auto_with_heavy_heads_leaves_the_last_stage_one_layer():
    """n=4: the last stage's heads (4 layers and 4 unembeddings) outweigh the 4-layer trunk,
    so every split is bounded by the last stage, least with one trunk layer there."""
    cfg = tiny("parallel.pipeline=2")
    assert pipeline_split(cfg.model, cfg.parallel) == (3, 1)
    assert flops(cfg, (3, 1))[1] > flops(cfg, (3, 1))[0]


def test_auto_matches_splits_worked_out_by_hand():
    """n=1, small vocabulary: with c the FLOPs of a layer, the last stage costs (k + 1) c + U
    (U its unembedding, here 0 < U < c), any other k c. Over 8 layers, PP2: (5, 3), bound 5c
    (4+4 would cost 5c + U). PP4: bound 3c (2c + U with two layers on the others places only
    7); at most 3 layers on each of the first three and 1 on the last place 10, and the two
    surplus layers come off the costliest stages, the later first: (3, 2, 2, 1)."""
    cfg = tiny("model.n_future_tokens=1", "model.num_layers=8")
    c = flops(cfg, (7, 1))[0] / 7
    u = flops(cfg, (7, 1))[1] - 2 * c
    assert 0 < u < c
    assert balanced_split(cfg.model, 2) == (5, 3)
    assert balanced_split(cfg.model, 4) == (3, 2, 2, 1)
    assert max(flops(cfg, (5, 3))) < max(flops(cfg, (4, 4)))
    assert balanced_split(cfg.model, 1) == (8,)


def test_even_and_lists_are_taken_as_given():
    cfg = tiny("parallel.pipeline=2", "parallel.pipeline_layers=even")
    assert pipeline_split(cfg.model, cfg.parallel) == (2, 2)
    cfg = tiny("parallel.pipeline=2", "parallel.pipeline_layers=[1,3]")
    assert pipeline_split(cfg.model, cfg.parallel) == (1, 3)
    assert pipeline_split(cfg.model, ParallelConfig(pipeline=1)) == (4,)
    assert pipeline_layout((1, 3)) == "Et|tttL"
    assert pipeline_layout((2, 2)) is None  # megatron-core's own even division


@pytest.mark.parametrize("name", ["13b-n1", "13b-n4"])
def test_auto_is_optimal_for_13b_at_pp4_and_the_planner_prices_it(name):
    """13B n=1's 39 trunk layers at PP4 were refused before. No split has a cheaper slowest
    stage than auto's (every split with >= 1 layer per stage tried), and the planner prices
    the layout with it."""
    cfg = config.load(ROOT / f"configs/paper/{name}.yaml", ["parallel.pipeline=4"])
    layers = cfg.model.num_layers
    split = pipeline_split(cfg.model, cfg.parallel)
    assert sum(split) == layers and len(split) == 4 and min(split) >= 1
    best = min(
        max(flops(cfg, (a, b, c, layers - a - b - c)))
        for a, b, c in itertools.product(range(1, layers), repeat=3)
        if a + b + c < layers
    )
    assert max(flops(cfg, split)) == best
    nearly_even = tuple(layers // 4 + (i >= 4 - layers % 4) for i in range(4))  # (9,10,10,10)
    assert max(flops(cfg, split)) < max(flops(cfg, nearly_even))
    run = layouts.check(layouts.with_layout(cfg, 8, 4, 1, False), 64)
    planned = layouts.plan(cfg, run, layouts.Hardware(64)).stages
    assert tuple(s.trunk_layers for s in planned) == split


def test_dry_run_tiles_an_uneven_split():
    """Each stage built on the meta device holds its share, numbered globally: the sharded
    state dicts tile every parameter once."""
    # Its own process: the dry run stands up a fake world, which an in-process test's real
    # process group (tests/conftest.py's megatron_1proc) would be in the way of.
    proc = subprocess.run(
        [sys.executable, "-m", "mtp_dist.plan", "configs/tiny.yaml", "--dry-run", "--json",
         "--world", "4", "model.num_layers=4", "parallel.pipeline=2",
         "parallel.pipeline_layers=[1,3]", "parallel.tensor=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)["dry_run"]
    assert result["pipeline_layers"] == [1, 3]
    assert [p["pp_rank"] for p in result["positions"]] == [0, 0, 1, 1]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    run = tmp_path_factory.mktemp("pp1")
    train(1, run, *FOUR_LAYERS)
    return run


@pytest.fixture(scope="module")
def pp2_auto(tmp_path_factory):
    run = tmp_path_factory.mktemp("pp2auto")
    proc = train(2, run, *FOUR_LAYERS, "parallel.pipeline=2")
    assert "trunk layers per stage [3, 1] (parallel.pipeline_layers=auto)" in proc.stdout
    return run


def _same_losses(got: dict, ref: dict, steps) -> None:
    for step in steps:
        assert got[step] == pytest.approx(ref[step], rel=RESHARD_RTOL), step


@pytest.mark.slow
def test_uneven_split_trains_like_one_process(one_process, pp2_auto):
    _same_losses(losses(pp2_auto), losses(one_process), range(1, 5))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("nproc", "layout"), [(2, ["parallel.pipeline=2", "parallel.pipeline_layers=[1,3]"]), (1, [])]
)
def test_checkpoint_of_one_split_continues_at_another(
    one_process, pp2_auto, tmp_path, nproc, layout
):
    """Saved at step 2 with [3, 1]; continued with [1, 3] and in one process: steps 3-4 give
    the one-process losses (the model and the optimizer state resharded)."""
    start = pp2_auto / "checkpoints" / "step_00000002"
    train(nproc, tmp_path, *FOUR_LAYERS, f"train.resume={start}", *layout)
    assert steps_logged_since(tmp_path, 0) == [3, 4]
    _same_losses(losses(tmp_path), losses(one_process), (3, 4))
