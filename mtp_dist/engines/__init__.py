"""Training engines, found by name in one table; nothing outside this package branches on an
engine's name. Each engine class provides the contract of engines/base.py: check_config, the
model's construction and initial weights, build, train/eval steps, save/load and
load_full_weights (for the export).

Adding an engine is one module here and one row below (and, if it needs options, its section
in config.py).
"""

from __future__ import annotations

import importlib

from mtp_dist.config import Config, ConfigError

ENGINES = {
    "megatron": "mtp_dist.engines.megatron:MegatronEngine",
    "deepspeed": "mtp_dist.engines.deepspeed.engine:DeepSpeedEngine",
}


def engine_class(name: str):
    """The engine class registered as `name` (imported on first use: engines are heavy)."""
    if name not in ENGINES:
        raise ConfigError(f"engine={name!r} is not an engine: use one of {', '.join(ENGINES)}")
    module, _, cls = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def check_config(cfg: Config, plan) -> None:
    """The engine's own requirements on the config (ConfigError), before any compute."""
    engine_class(cfg.engine).check_config(cfg, plan)


def build_model(cfg: Config, plan, dims, source=None):
    """This stage's model with its initial weights (random, or the full tensors of `source`:
    model.init_from), built and initialised the way the engine holds parameters
    (collective)."""
    from mtp_dist.model.costs import pipeline_split
    from mtp_dist.model.model import build_model as build

    engine = engine_class(cfg.engine)
    with engine.model_construction(cfg, plan, dims):
        model = build(
            cfg.model,
            dims.tp,
            dims.pp,
            dims.pp_rank,
            dtype=plan.torch_dtype,
            device=dims.device,
            recompute=cfg.train.recompute,
            split=pipeline_split(cfg.model, cfg.parallel),
        )
    engine.init_weights(cfg, dims, model, source)
    model.set_trainable(cfg.train.trainable)  # before the engine: it gives frozen ones nothing
    return model


def build_engine(cfg: Config, plan, dims, model):
    """The configured engine, wrapping this stage's model."""
    return engine_class(cfg.engine)(cfg, plan, dims, model)
