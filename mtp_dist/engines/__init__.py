"""Training engines, found by name in one table; nothing outside this package branches on an
engine's name. Each engine class provides the contract of engines/base.py: check_config, build,
train/eval steps, save/load and load_full_weights (for the export).

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


def build_engine(cfg: Config, plan, dims, model):
    """The configured engine, wrapping this stage's model."""
    return engine_class(cfg.engine)(cfg, plan, dims, model)
