"""Shared fixtures (helpers live in tests/support.py): a one-process megatron-core setup for
in-process unit tests."""

from __future__ import annotations

import os
import sys

import psutil
import pytest

from mtp_dist.distributed import free_port

RENDEZVOUS_VARS = ("MASTER_ADDR", "MASTER_PORT")


def pytest_configure(config):
    """Scripts the tests run (launch/, slurm/, the SLURM cluster's jobs) call `python`: make it
    the interpreter running the tests, so that a virtual environment need not be activated."""
    bin_dir = os.path.dirname(sys.executable)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])


@pytest.fixture(scope="session")
def megatron_1proc():
    """torch.distributed (1 rank, gloo) and megatron-core's groups for in-process tests.

    distributed.init exports the launcher variables for libraries that read them (DeepSpeed
    wants LOCAL_RANK); the rendezvous address is taken back out, or every training a later
    test starts would inherit this process's port, which it holds (EADDRINUSE)."""
    before = {k: os.environ.get(k) for k in RENDEZVOUS_VARS}
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    from mtp_dist import distributed

    dims = distributed.init(1, 1, seed=1)
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    return dims


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
