"""Shared fixtures (helpers live in tests/support.py): a one-process megatron-core setup for
in-process unit tests."""

from __future__ import annotations

import os

import pytest

from mtp_dist.distributed import free_port


@pytest.fixture(scope="session")
def megatron_1proc():
    """torch.distributed (1 rank, gloo) and megatron-core's groups for in-process tests."""
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    from mtp_dist import distributed

    return distributed.init(1, 1, seed=1)
