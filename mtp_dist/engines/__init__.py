"""Training engines: megatron-core (DDP + distributed optimizer) and DeepSpeed (ZeRO)."""

from __future__ import annotations


def build_engine(cfg, dims, model):
    """The engine named by cfg.engine, wrapping this stage's model."""
    if cfg.engine == "megatron":
        from mtp_dist.engines.megatron import MegatronEngine

        return MegatronEngine(cfg, dims, model)
    if cfg.engine == "deepspeed":
        from mtp_dist.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, dims, model)
    raise ValueError(f"engine={cfg.engine!r}: use megatron or deepspeed")
