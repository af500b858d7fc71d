"""Shared fixtures (helpers live in tests/support.py): a one-process megatron-core setup for
in-process unit tests."""

from __future__ import annotations

import os
import sys

import psutil
import pytest


def pytest_configure(config):
    """Scripts the tests run (launch/, slurm/, the SLURM cluster's jobs) call `python`: make it
    the interpreter running the tests, so that a virtual environment need not be activated."""
    bin_dir = os.path.dirname(sys.executable)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])


@pytest.fixture(scope="session")
def megatron_1proc():
    """torch.distributed (1 rank, gloo, an in-memory store: no port) and megatron-core's groups
    for in-process tests."""
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


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A real two-node SLURM cluster (tests/slurm_cluster.py), one for the whole session. Where
    it cannot start (not root, no apt) the tests that need it skip, except in CI (CI=true),
    where that is a failure."""
    from tests.slurm_cluster import SlurmCluster, Unavailable

    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except Unavailable as e:
        cluster.stop()
        if os.environ.get("CI") == "true":
            pytest.fail(f"the SLURM test cluster must run in CI but cannot: {e}")
        pytest.skip(f"no SLURM test cluster on this machine: {e}")
    except BaseException:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()
