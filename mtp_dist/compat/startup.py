"""A CPU shim for megatron-core's import: without it every process on a machine without a GPU
spends about 2 s loading torch's compiler, for functions that are never called.

megatron-core decorates its fused bias/activation, bias/dropout and rope functions with
`megatron.core.jit.jit_fuser`, which is `torch.compile` on torch >= 2.2; applying the decorator
imports torch._dynamo and torch._inductor when megatron-core is imported. mtp-dist turns every
one of those fusions off (model/spec.py), so the compiled functions never run. `install()`,
called by mtp_dist/__init__.py before anything imports megatron-core, makes megatron-core's own
`disable_jit_fuser()` run right after megatron.core.jit is imported (before any fusion module
reads `jit_fuser`), and only when torch sees no GPU: on a GPU nothing changes.

This module imports nothing heavy: data_prep's commands import mtp_dist without torch.
"""

from __future__ import annotations

import importlib.abc
import sys

from mtp_dist.compat import Upstream

JIT_MODULE = "megatron.core.jit"
UPSTREAM = [
    Upstream("megatron.core.jit:disable_jit_fuser", "jit_fuser = noop_decorator"),
    Upstream("megatron.core.fusions.fused_bias_swiglu", "from megatron.core.jit import jit_fuser"),
]


class _DisableJitFuserOnCpu(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when megatron.core.jit is about to be imported, it wraps the real
    loader's exec_module so that disable_jit_fuser() follows it (on a machine without a GPU)."""

    def find_spec(self, name, path, target=None):
        if name != JIT_MODULE:
            return None
        sys.meta_path.remove(self)  # once, and the other finders find the module
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            import torch  # megatron.core.jit has just imported it

            if not torch.cuda.is_available():
                module.disable_jit_fuser()

        spec.loader.exec_module = exec_module  # this module's own loader object
        return spec


def install() -> None:
    """Arm the finder, unless megatron-core is already imported (then it is too late)."""
    if JIT_MODULE in sys.modules or any(
        isinstance(f, _DisableJitFuserOnCpu) for f in sys.meta_path
    ):
        return
    sys.meta_path.insert(0, _DisableJitFuserOnCpu())
