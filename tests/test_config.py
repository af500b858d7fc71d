"""The typed config: strict YAML, overrides, and one clear error per inconsistency."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtp_dist import config as C
from mtp_dist.config import ConfigError
from mtp_dist.run_plan import resolve

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("**/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses(path):
    cfg = C.load(path, ["data.tokenizer=null"])
    assert cfg.model.n_future_tokens >= 1


def test_overrides_are_typed_and_nested():
    cfg = C.load(
        None,
        [
            "model.n_future_tokens=4",
            "train.lr=1e-4",
            "data.synthetic=true",
            "model.head_loss_weights=[1, 0.5, 0.5, 0.5]",
        ],
    )
    assert cfg.model.n_future_tokens == 4
    assert cfg.train.lr == 1e-4
    assert cfg.model.head_loss_weights == [1.0, 0.5, 0.5, 0.5]


def test_round_trip_through_yaml(tmp_path):
    cfg = C.load(None, ["model.n_future_tokens=2", "data.synthetic=true"])
    cfg.dump(tmp_path / "c.yaml")
    assert C.load(tmp_path / "c.yaml") == cfg


def err(*overrides: str) -> str:
    with pytest.raises(ConfigError) as e:
        C.load(None, ["data.synthetic=true", *overrides])
    return str(e.value)


def test_unknown_key_names_it():
    assert "unknown key model.n_heads" in err("model.n_heads=4")


def test_unknown_section_names_it():
    assert "unknown key trainer" in err("trainer.steps=4")


def test_wrong_type_names_key():
    assert "train.steps must be int" in err("train.steps=ten")


def test_bool_is_not_an_int():
    assert "model.num_layers must be int, got a boolean" in err("model.num_layers=true")


def test_bad_choice_names_key():
    assert "model.head_backward='both' is not one of" in err("model.head_backward=both")


def test_attention_defaults_to_sdpa_and_names_a_bad_choice():
    assert C.load(None, ["data.synthetic=true"]).model.attention == "sdpa"
    assert (
        C.load(None, ["data.synthetic=true", "model.attention=megatron"]).model.attention
        == "megatron"
    )
    assert "model.attention='flash' is not one of" in err("model.attention=flash")


def test_n_below_one():
    assert "model.n_future_tokens must be >= 1" in err("model.n_future_tokens=0")


def test_layers_not_divisible_by_pipeline():
    assert "model.num_layers=4 is not divisible by parallel.pipeline=3" in err(
        "model.num_layers=4", "parallel.pipeline=3", "parallel.pipeline_layers=even"
    )


def test_world_size_not_divisible_by_tp_pp():
    cfg = C.load(None, ["data.synthetic=true", "parallel.tensor=2", "parallel.pipeline=2"])
    with pytest.raises(ConfigError, match="does not divide the world size 6"):
        resolve(cfg, 6, on_gpu=False)
    assert resolve(cfg, 8, on_gpu=False).dp == 2


def test_global_batch_not_divisible_by_dp():
    cfg = C.load(
        None, ["data.synthetic=true", "train.micro_batch_size=2", "train.global_batch_size=6"]
    )
    with pytest.raises(ConfigError, match="train.global_batch_size=6"):
        resolve(cfg, 2, on_gpu=False)


def test_plan_derives_every_quantity_once():
    cfg = C.load(
        None,
        [
            "data.synthetic=true",
            "parallel.tensor=2",
            "train.micro_batch_size=2",
            "train.global_batch_size=16",
            "train.steps=10",
            "train.eval_interval=5",
            "train.eval_steps=2",
            "model.seq_length=128",
        ],
    )
    plan = resolve(cfg, 8, on_gpu=False)
    assert (plan.dp, plan.num_microbatches, plan.dtype) == (4, 2, "fp32")
    assert plan.train_samples == 160 and plan.eval_samples == 3 * 2 * 16
    assert plan.tokens_per_step == 16 * 128
    assert resolve(cfg, 8, on_gpu=True).dtype == "bf16"
    fp32 = C.load(None, ["data.synthetic=true", "train.dtype=fp32"])
    assert resolve(fp32, 1, on_gpu=True).dtype == "fp32"


def test_tensor_parallel_must_divide_heads():
    assert "parallel.tensor=3" in err("parallel.tensor=3")


def test_head_weights_length():
    assert "model.head_loss_weights has 1 entries" in err(
        "model.n_future_tokens=2", "model.head_loss_weights=[1.0]"
    )


def test_vocab_size_must_match_tokenizer():
    from mtp_dist.data import configured_tokenizer_hash

    cfg = C.load(None, ["data.paths=[x]", "data.tokenizer=byte", "model.vocab_size=300"])
    with pytest.raises(ConfigError, match="model.vocab_size=300 does not match the tokenizer"):
        configured_tokenizer_hash(cfg.data.tokenizer, cfg.model.vocab_size)
    assert configured_tokenizer_hash("byte", 259)


def test_config_validation_does_no_io():
    """A tokenizer that does not exist is the data check's business, not the config's."""
    cfg = C.load(None, ["data.paths=[x]", "data.tokenizer=/no/such.model"])
    assert cfg.data.tokenizer == "/no/such.model"


def test_missing_data_paths():
    with pytest.raises(ConfigError, match="data.paths is empty"):
        C.load(None, [])


def engine_err(*overrides: str) -> str:
    from mtp_dist import engines

    cfg = C.load(None, ["data.synthetic=true", *overrides])
    with pytest.raises(ConfigError) as e:
        engines.check_config(cfg, resolve(cfg, 2, on_gpu=False))
    return str(e.value)


def test_deepspeed_zero3_with_pipeline_rejected():
    assert "DeepSpeed supports pipelines with ZeRO-1 only" in engine_err(
        "engine=deepspeed", "deepspeed.zero_stage=3", "parallel.pipeline=2"
    )


def test_deepspeed_zero0_is_a_config_error():
    assert "deepspeed.zero_stage=0 is not supported" in engine_err(
        "engine=deepspeed", "deepspeed.zero_stage=0"
    )


def test_unknown_engine_names_the_choices():
    assert "engine='fsdp' is not an engine: use one of megatron, deepspeed" in engine_err(
        "engine=fsdp"
    )


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        C.load("/nonexistent.yaml")


def test_malformed_override():
    assert "must look like key=value" in err("train.steps")
