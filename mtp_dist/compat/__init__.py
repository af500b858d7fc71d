"""Every place where mtp-dist patches, works around or relies on the private code of its
dependencies, in one package, each guarded the same way.

- `cpu`: shims that let megatron-core and DeepSpeed run without a GPU; applied by
  `distributed.init` only when no GPU is present.
- `startup`: the CPU shim that must act while megatron-core is being imported (it skips
  torch.compile's import-time cost); armed by mtp_dist/__init__.py, acting only without a GPU.
- `megatron`, `megatron_data`, `deepspeed`: fixes of upstream bugs and uses of private
  upstream API; they apply on every device (a bug is a bug on a GPU too).

Each module lists the upstream source it relies on as `UPSTREAM = [Upstream(...), ...]`, and
checks its entries before patching, so an upgrade that moves things fails loudly instead of
running unpatched code. `check_all()` verifies every entry (tests/test_compat.py).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

MODULES = ("cpu", "startup", "megatron", "megatron_data", "deepspeed")


class UpstreamChanged(RuntimeError):
    """Upstream code no longer looks like what a patch here was written for."""


@dataclass(frozen=True)
class Upstream:
    """A piece of upstream source that a patch relies on: `needle` must occur in the source of
    `target` ("package.module" or "package.module:Qualified.name")."""

    target: str
    needle: str

    def resolve(self):
        module, _, qualname = self.target.partition(":")
        obj = importlib.import_module(module)
        for part in filter(None, qualname.split(".")):
            obj = getattr(obj, part)
        return obj

    def check(self) -> None:
        try:
            source = inspect.getsource(self.resolve())
        except (ImportError, AttributeError, OSError, TypeError) as e:
            raise UpstreamChanged(
                f"compat: {self.target} is gone ({e}); review mtp_dist/compat"
            ) from e
        if self.needle not in source:
            raise UpstreamChanged(
                f"compat: {self.target} no longer contains {self.needle!r}; the upstream code "
                "changed: review the patch in mtp_dist/compat that relies on it"
            )


def replace(owner, name: str, new) -> None:
    """Patch `owner.name` with `new`, keeping the original as `new.__wrapped__`: the guards
    read upstream's source through it (inspect unwraps), before and after patching alike."""
    original = inspect.getattr_static(owner, name)
    func = new.__func__ if isinstance(new, staticmethod) else new
    func.__wrapped__ = original.__func__ if isinstance(original, staticmethod) else original
    setattr(owner, name, new)


def check(entries: list[Upstream]) -> None:
    for entry in entries:
        entry.check()


def check_all() -> None:
    """Verify every upstream entry of every compat module."""
    for name in MODULES:
        check(importlib.import_module(f"{__name__}.{name}").UPSTREAM)


KNOWN_WARNINGS = [
    # megatron-core on a machine without Apex / Transformer Engine: it falls back to torch.
    (UserWarning, r"Transformer Engine and Apex are not installed"),
    (UserWarning, r"Apex is not installed\. Falling back to Torch Norm"),
    # megatron-core 0.16's own default cuda_graph_scope trips its own deprecation notice.
    (UserWarning, r"full scope is deprecated\. Use empty cuda_graph_scope"),
    # megatron-core's optimizer probes `.grad` with hasattr() on every parameter.
    (UserWarning, r"The \.grad attribute of a Tensor that is not a leaf Tensor"),
    # megatron-core 0.16 calls collectives that torch 2.13 renamed; they still work.
    (FutureWarning, r"`torch\.distributed\.reduce_scatter_tensor` is deprecated"),
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),
]
"""Warnings that are expected and harmless here, by category and message; everything else
(upstream deprecations above all: the early sign of the drift these guards exist for) shows.
pyproject.toml's pytest filterwarnings lists the same entries (tests/test_compat.py checks)."""


def ignore_known_warnings() -> None:
    import warnings

    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


UPSTREAM_MODULES = r"(megatron|torch|deepspeed|transformers|huggingface_hub|safetensors)(\.|$)"
"""Packages whose own warnings a command's user cannot act on."""

VERBOSE_VARIABLE = "MTP_DIST_VERBOSE"


def quiet_upstream_warnings(verbose: bool = False) -> None:
    """For commands whose output is their product (generate, export): hide the warnings that
    upstream packages raise from their own code (deprecations inside megatron-core or torch's
    checkpointing, fallbacks without Apex) unless --verbose or MTP_DIST_VERBOSE=1 asks for
    them. Call it before the upstream packages are imported: some warn at import."""
    import os
    import warnings

    if verbose or os.environ.get(VERBOSE_VARIABLE, "") not in ("", "0"):
        return
    ignore_known_warnings()
    warnings.filterwarnings("ignore", module=UPSTREAM_MODULES)
