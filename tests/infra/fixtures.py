"""pytest fixtures for the test infrastructure.

Use from a test module or a conftest.py::

    from tests.infra.fixtures import slurm_cluster, netns_pair  # noqa: F401  (fixtures)
"""

from __future__ import annotations

import os

import pytest

from . import netns as _netns
from . import slurm_cluster as _slurm


@pytest.fixture(scope="session")
def slurm_cluster() -> _slurm.SlurmCluster:
    """A running one-node SLURM cluster (started once, reused across runs).

    Skips only when the SLURM/munge binaries are not installed; any other problem (not root,
    daemons failing to start) is an error, so a broken CI setup is not hidden as a skip.
    """
    if not _slurm.slurm_available():
        pytest.skip(
            f"SLURM not installed (missing {', '.join(_slurm.missing_binaries())}); "
            "run .ci/install_system_deps.sh as root"
        )
    if os.geteuid() != 0:
        pytest.skip("starting the test SLURM cluster needs root")
    return _slurm.ensure_slurm_cluster()


@pytest.fixture
def netns_pair():
    """Two network namespaces joined by a veth pair (10.77.0.1/24 <-> 10.77.0.2/24)."""
    reason = _netns.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with _netns.NetnsPair() as pair:
        yield pair
