"""Uses of DeepSpeed's private API and workarounds of its limits, for every device.

- A universal checkpoint is chosen per load, but DeepSpeed reads the choice from its config
  object (`engine._config.load_universal_checkpoint`), which is fixed at initialize.
- DeepSpeed's ZeRO-3 hooks do not expect megatron-core's reentrant activation recompute:
  the trunk's layers are wrapped in torch's non-reentrant checkpoint instead.
"""

from __future__ import annotations

from functools import partial

import torch

from mtp_dist.compat import Upstream, check

UPSTREAM = [
    Upstream(
        "deepspeed.runtime.engine:DeepSpeedEngine.load_universal_checkpoint",
        "return self._config.load_universal_checkpoint",
    ),
    Upstream("megatron.core.transformer.transformer_block:TransformerBlock", "layer("),
]


def set_universal_load(engine, universal: bool) -> None:
    """Make the next engine.load_checkpoint read a universal checkpoint (or not)."""
    check(UPSTREAM[:1])
    engine._config.load_universal_checkpoint = universal


def checkpoint_layers(block) -> None:
    """Recompute each layer of a megatron-core TransformerBlock with torch's non-reentrant
    checkpoint (the block calls `layer(...)`, which goes through the instance's forward), and
    switch megatron-core's own recompute off."""
    check(UPSTREAM[1:])
    config = block.config
    config.recompute_granularity = None
    config.recompute_method = None
    config.recompute_num_layers = None
    for layer in block.layers:
        layer.forward = partial(
            torch.utils.checkpoint.checkpoint, layer.forward, use_reentrant=False
        )
