"""Shared fixtures (helpers live in tests/support.py): a one-process megatron-core setup for
in-process unit tests."""

from __future__ import annotations

import os

import psutil
import pytest

from mtp_dist.distributed import free_port


@pytest.fixture(scope="session")
def megatron_1proc():
    """torch.distributed (1 rank, gloo) and megatron-core's groups for in-process tests."""
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    from mtp_dist import distributed

    return distributed.init(1, 1, seed=1)


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind():
    """Every process a test starts ends with it: after the session, pytest has no children
    left (a leftover is named, killed, and the session fails)."""
    yield
    left = psutil.Process().children(recursive=True)
    _, alive = psutil.wait_procs(left, timeout=10)
    names = []
    for p in alive:
        try:
            names.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
            p.kill()
        except psutil.Error:
            pass
    assert not names, "processes outlived the tests: " + "; ".join(names)
