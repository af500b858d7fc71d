"""DeepSpeed engine checks that need no process group (the DeepSpeed JSON against train.*,
layouts the engine refuses, one line and exit 2 from the command line), and the one refusal that
is proved needed by building the real engine in this process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mtp_dist import config as C
from tests.support import ROOT


def _cfg(*overrides: str) -> C.Config:
    return C.load(ROOT / "configs" / "tiny.yaml", ["engine=deepspeed", *overrides])


def _plan(cfg: C.Config, world_size: int, on_gpu: bool = False):
    from mtp_dist.run_plan import resolve

    return resolve(cfg, world_size, on_gpu)


def _json(tmp_path: Path, body: dict) -> str:
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(body))
    return str(p)


@pytest.mark.parametrize(
    "body, message",
    [
        (
            {"train_micro_batch_size_per_gpu": 4},
            "train_micro_batch_size_per_gpu=4 contradicts train.micro_batch_size=2",
        ),
        ({"train_batch_size": 16}, "train_batch_size=16 contradicts train.global_batch_size=8"),
        ({"gradient_accumulation_steps": 1}, "gradient_accumulation_steps=1 contradicts"),
        (
            {"zero_optimization": {"stage": 3}},
            "zero_optimization.stage=3 contradicts deepspeed.zero_stage=1",
        ),
        ({"fp16": {"enabled": True}}, "fp16 is not supported"),
    ],
)
def test_contradicting_json_is_an_error(tmp_path, body, message):
    from mtp_dist.engines.deepspeed.ds_config import build_ds_config

    cfg = _cfg(f"deepspeed.config={_json(tmp_path, body)}")
    with pytest.raises(ValueError, match="deepspeed.config") as e:
        build_ds_config(cfg, _plan(cfg, 2), on_gpu=False)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_json_completed_from_train_config(tmp_path):
    from mtp_dist.engines.deepspeed.ds_config import build_ds_config

    path = _json(tmp_path, {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.5})
    cfg = _cfg(f"deepspeed.config={path}")
    ds = build_ds_config(cfg, _plan(cfg, 2), on_gpu=False)
    assert ds["train_batch_size"] == 8 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5  # the JSON's own setting wins where train.* is silent
    assert ds["zero_optimization"]["stage"] == 1 and not ds["bf16"]["enabled"]
    assert "optimizer" not in ds  # CPU: torch AdamW as the client optimizer


def test_gpu_config_uses_bf16_and_deepspeed_adamw():
    from mtp_dist.engines.deepspeed.ds_config import build_ds_config

    ds = build_ds_config(_cfg(), _plan(_cfg(), 1, on_gpu=True), on_gpu=True)
    assert ds["bf16"]["enabled"] and ds["optimizer"]["type"] == "AdamW"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_ready_made_configs(stage):
    from mtp_dist.engines.deepspeed.ds_config import build_ds_config

    path = ROOT / "configs" / "deepspeed" / f"zero{stage}.json"
    cfg = _cfg(f"deepspeed.zero_stage={stage}", f"deepspeed.config={path}")
    assert build_ds_config(cfg, _plan(cfg, 2), on_gpu=False)["zero_optimization"]["stage"] == stage


def _check(cfg: C.Config) -> None:
    from mtp_dist.engines import check_config

    check_config(cfg, _plan(cfg, 2))


@pytest.mark.parametrize("stage", [2, 3])
def test_zero23_with_pipeline_is_a_config_error(stage):
    with pytest.raises(C.ConfigError, match=f"deepspeed.zero_stage={stage} with parallel.pipeline"):
        _check(_cfg(f"deepspeed.zero_stage={stage}", "parallel.pipeline=2"))


def test_unsupported_layouts_are_config_errors():
    """The engine's own checks run at config time (no process group, no model)."""
    with pytest.raises(C.ConfigError, match="deepspeed.zero_stage=0 is not supported"):
        _check(_cfg("deepspeed.zero_stage=0"))
    tied = _cfg("parallel.pipeline=2", "model.tie_embeddings=true")
    with pytest.raises(C.ConfigError, match="model.tie_embeddings with parallel.pipeline>1"):
        _check(tied)


BF16_FP32_ACCUM = {"data_types": {"grad_accum_dtype": "fp32"}}
"""With bf16 parameters and ZeRO-1, DeepSpeed picks BF16_Optimizer for this JSON."""


def test_zero1_bf16_with_fp32_accumulation_is_refused(tmp_path):
    cfg = _cfg("train.dtype=bf16", f"deepspeed.config={_json(tmp_path, BF16_FP32_ACCUM)}")
    with pytest.raises(C.ConfigError) as e:
        _check(cfg)
    message = str(e.value)
    assert "\n" not in message
    for part in ("deepspeed.config", "data_types.grad_accum_dtype=fp32", "deepspeed.zero_stage=1",
                 "deepspeed.zero_stage=2", "remove data_types.grad_accum_dtype"):  # fmt: skip
        assert part in message


@pytest.mark.parametrize(
    "dtype, stage, body",
    [
        ("bf16", 2, BF16_FP32_ACCUM),  # DeepSpeedZeroOptimizer, not BF16_Optimizer
        ("fp32", 1, BF16_FP32_ACCUM),
        ("bf16", 1, {"data_types": {"grad_accum_dtype": "bf16"}}),
        (
            "bf16",
            1,
            # DeepSpeed keeps its ZeRO optimizer when the optimizer is offloaded to the CPU
            {**BF16_FP32_ACCUM, "zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
        ),
    ],
)
def test_configs_without_bf16_optimizer_are_accepted(tmp_path, dtype, stage, body):
    path = _json(tmp_path, body)
    _check(
        _cfg(f"train.dtype={dtype}", f"deepspeed.zero_stage={stage}", f"deepspeed.config={path}")
    )


def test_bf16_optimizer_refusal_is_needed(megatron_1proc, tmp_path):
    """The refused configuration, built for real (bypassing check_config): DeepSpeed picks
    BF16_Optimizer, and the engine's train_step fails in coalesce_grad_reduction(). If this
    stops failing upstream, the refusal is stale and can go."""
    import torch

    from mtp_dist import engines
    from mtp_dist.engines.deepspeed.engine import DeepSpeedEngine

    cfg = _cfg("train.dtype=bf16", f"deepspeed.config={_json(tmp_path, BF16_FP32_ACCUM)}")
    plan = _plan(cfg, 1)
    model = engines.build_model(cfg, plan, megatron_1proc)
    engine = DeepSpeedEngine(cfg, plan, megatron_1proc, model)
    assert type(engine.ds.optimizer).__name__ == "BF16_Optimizer"
    m = cfg.model
    tokens = torch.zeros(cfg.train.micro_batch_size, m.seq_length + m.n_future_tokens).long()
    batches = [{"tokens": tokens}] * plan.num_microbatches
    with pytest.raises(NotImplementedError, match="coalesce_grad_reduction .*BF16_Optimizer"):
        engine.train_step(batches)


def test_deepspeed_bf16_must_agree_with_train_dtype(tmp_path):
    from mtp_dist.engines.deepspeed.ds_config import build_ds_config

    cfg = _cfg(
        "train.dtype=fp32", f"deepspeed.config={_json(tmp_path, {'bf16': {'enabled': True}})}"
    )
    with pytest.raises(C.ConfigError, match="bf16.enabled=true contradicts train.dtype=fp32"):
        build_ds_config(cfg, _plan(cfg, 2), on_gpu=False)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["deepspeed.zero_stage=0"], "deepspeed.zero_stage=0 is not supported"),
        (["train.dtype=bf16", "deepspeed.config=JSON"], "deepspeed.config "),
    ],
)
@pytest.mark.slow
def test_refusals_exit_2_from_the_command_line(tmp_path, overrides, message):
    json_path = _json(tmp_path, BF16_FP32_ACCUM)
    proc = subprocess.run(
        [sys.executable, "-m", "mtp_dist.train", "--config", "configs/tiny.yaml",
         f"run.dir={tmp_path / 'run'}", "data.synthetic=true", "engine=deepspeed",
         *(o.replace("JSON", json_path) for o in overrides)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith(f"error: {message}")
    assert proc.stderr.count("\n") == 1, proc.stderr
