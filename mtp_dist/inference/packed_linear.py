"""CPU decoding with pre-packed weights: every megatron-core linear layer's matrix multiply runs
on a copy of its weight that oneDNN has reordered once into its blocked layout.

Why: a decoding forward multiplies a few rows by each weight. On a GPU that reads the weight
once whatever the rows (memory-bound), so a verifying forward of k tokens costs about what a
greedy forward of one costs. A CPU's BLAS gemm instead repacks the weight at every call: measured
on this project's 2-core machine (fp32, one thread, a 4096 x 1024 weight), one row takes
0.57 ms, four rows 1.56 ms; with the weight packed once, 0.33 and 0.48 ms. Packing makes
greedy decoding faster and gives self-speculative decoding the cost model it has on a GPU.
It is PyTorch's own CPU inference path (what torch.compile's weight freezing does on CPU).

The packed copies live only inside `packed_weights(model)` (a decoding call): made on entry,
dropped on exit, so weights loaded or trained in between are never read from a stale copy. They
double the weights' memory meanwhile, so they are made only if that fits in half the free
memory (else a warning). Without them, and for anything else (grad enabled, another dtype or
device, no oneDNN), the layers take megatron-core's own path.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from torch import Tensor


def available() -> bool:
    """Whether this PyTorch has oneDNN's packed linear (CPU builds for x86 and Arm do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class _PackedMatmul:
    """A linear layer's `_forward_impl` multiplying by the packed copy of its weight (no grad,
    fp32, CPU); anything else goes to the layer's own implementation."""

    def __init__(self, layer: torch.nn.Module):
        self.fallback = layer._forward_impl
        self.packed: dict[int, tuple[Tensor, Tensor]] = {}
        """id(weight) -> (the weight, its packed copy): the layer's own weight, or the one the
        caller passes (a tied unembedding)."""

    def __call__(self, input: Tensor, weight: Tensor, bias: Tensor | None = None, **kwargs):
        if torch.is_grad_enabled() or not input.dtype == weight.dtype == torch.float32:
            return self.fallback(input, weight, bias, **kwargs)
        entry = self.packed.get(id(weight))
        if entry is None or entry[0] is not weight:
            entry = (weight, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None))
            self.packed[id(weight)] = entry
        rows = input.reshape(-1, input.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(rows, entry[1], bias, "none", [], "")
        return out.view(*input.shape[:-1], out.shape[-1])


def _fits(model: torch.nn.Module) -> bool:
    """Whether copies of the weights fit in half the memory now free (else: warn, don't pack)."""
    import psutil

    from mtp_dist.metrics import format_bytes

    need = sum(p.numel() * p.element_size() for p in model.parameters())
    free = psutil.virtual_memory().available
    if need <= free / 2:
        return True
    warnings.warn(
        f"decoding without packed weights: their copies need {format_bytes(need)}, and only "
        f"{format_bytes(free)} of memory is free (slower on CPU, the same tokens)",
        stacklevel=3,
    )
    return False


@contextlib.contextmanager
def packed_weights(model: torch.nn.Module, enabled: bool = True):
    """Inside: the no-grad fp32 forwards of every megatron-core linear layer of `model` (on CPU,
    with oneDNN) multiply by packed copies of the weights, made at first use."""
    device = next(model.parameters()).device
    if not (enabled and device.type == "cpu" and available() and _fits(model)):
        yield
        return
    layers = [
        m
        for m in model.modules()
        if isinstance(m, ColumnParallelLinear | RowParallelLinear)
        and not isinstance(m.__dict__.get("_forward_impl"), _PackedMatmul)  # nested: the outer's
    ]
    for layer in layers:
        layer._forward_impl = _PackedMatmul(layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer._forward_impl  # back to the class's method
