"""pytest fixtures for the simulated a9s-pg cluster.

One cluster per test session (bring-up takes a few seconds, and the machine has two cores
shared with other work). Register them in the top-level conftest with
`pytest_plugins = ["tests.simcluster.fixtures"]` or by importing the fixtures.

Tests that break the cluster on purpose should ask for `healthy_sim_cluster`, which waits for
(and if need be rebuilds) a healthy cluster before the test; tests that need pristine data
call `sim_cluster.rebuild()`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from .cluster import SimCluster, missing_prerequisites
from .config import ClusterConfig


def session_config() -> ClusterConfig:
    """The session cluster: `pgsim` on 10.77.0.0/24 unless PGSIM_NAME / PGSIM_SUBNET say
    otherwise (to run two test sessions side by side)."""
    return ClusterConfig(
        name=os.environ.get("PGSIM_NAME", ClusterConfig.name),
        subnet=os.environ.get("PGSIM_SUBNET", ClusterConfig.subnet),
    )


def skip_unless_simcluster_possible() -> None:
    """Skip the calling test (or fixture) with the reason the simulator cannot run here;
    under CI (`CI` set) fail instead: a CI machine must not pass by testing nothing."""
    problems = missing_prerequisites()
    if problems:
        reason = "simulated a9s-pg cluster unavailable: " + "; ".join(problems)
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


def self_dropping_config() -> ClusterConfig:
    """A second cluster whose helper functions drop privileges themselves
    (`helper_privileges="helper"`): `pgsimh` on 10.77.5.0/24 unless PGSIM_HELPER_NAME /
    PGSIM_HELPER_SUBNET say otherwise."""
    return ClusterConfig(
        name=os.environ.get("PGSIM_HELPER_NAME", "pgsimh"),
        subnet=os.environ.get("PGSIM_HELPER_SUBNET", "10.77.5"),
        helper_privileges="helper",
    )


@pytest.fixture(scope="session")
def sim_cluster() -> Iterator[SimCluster]:
    """A healthy 3-VM a9s-pg cluster (pg/0 primary, pg/1 and pg/2 standbys) for the session.

    Leftovers of an earlier, crashed run are removed before bring-up; everything is torn down
    at the end of the session, also when bring-up fails.
    """
    skip_unless_simcluster_possible()
    cluster = SimCluster(session_config())
    # Another session using the same name makes this one wait (up to PGSIM_LOCK_WAIT_S).
    cluster.up(lock_wait_s=float(os.environ.get("PGSIM_LOCK_WAIT_S", "300")))
    try:
        yield cluster
    finally:
        cluster.down()


@pytest.fixture(scope="module")
def self_dropping_sim_cluster() -> Iterator[SimCluster]:
    """A healthy 3-VM cluster in the other helper convention (see `self_dropping_config`),
    for the tests of one module: six PostgreSQL servers at once are too many for a whole
    session on a 2-core machine."""
    skip_unless_simcluster_possible()
    cluster = SimCluster(self_dropping_config())
    cluster.up(lock_wait_s=float(os.environ.get("PGSIM_LOCK_WAIT_S", "300")))
    try:
        yield cluster
    finally:
        cluster.down()


@pytest.fixture
def healthy_sim_cluster(sim_cluster: SimCluster) -> SimCluster:
    """`sim_cluster`, healthy at the start of the test: injected faults are undone (see
    `SimCluster.heal`), and a cluster that does not recover within 30 s is rebuilt."""
    sim_cluster.heal(timeout=30)
    return sim_cluster
