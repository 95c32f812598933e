"""pytest fixtures: `bosh_director` (the emulator over the session's simulated cluster, one
per test so faults do not leak), `bosh_jumpbox` (jumpbox.py) and `bosh_cli` (the real bosh
CLI; under CI a CLI that cannot be built fails the test, never skips it)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.simcluster.cluster import SimCluster

from . import cli
from .director import Client, DirectorEmulator
from .jumpbox import bosh_jumpbox

__all__ = ["CLIENT_ID", "bosh_cli", "bosh_director", "bosh_jumpbox", "cli_environment"]

CLIENT_ID = "pgrecovery"


def cli_environment(director: DirectorEmulator, deployment: str) -> dict[str, str]:
    """What a bosh user's shell holds for `director` (and what local mode reads): os.environ
    with BOSH_ENVIRONMENT, BOSH_CA_CERT, BOSH_CLIENT, BOSH_CLIENT_SECRET, BOSH_DEPLOYMENT."""
    return {**os.environ,
            "BOSH_ENVIRONMENT": director.url,
            "BOSH_CA_CERT": str(director.ca_cert_path),
            "BOSH_CLIENT": CLIENT_ID,
            "BOSH_CLIENT_SECRET": director.clients[CLIENT_ID].secret,
            "BOSH_DEPLOYMENT": deployment}


@pytest.fixture
def bosh_director(sim_cluster: SimCluster) -> Iterator[DirectorEmulator]:
    """A director (UAA auth, client `pgrecovery` with bosh.admin) whose deployment
    `sim_cluster.config.deployment` is the simulated cluster. Any bosh_* user left on the VMs
    by the test is removed afterwards."""
    deployment = sim_cluster.config.deployment
    director = DirectorEmulator(
        {deployment: sim_cluster.vms},
        clients={CLIENT_ID: Client(os.urandom(12).hex())},
    )
    with director:
        yield director
        for vm in sim_cluster.vms:
            if vm.running:
                vm.run(
                    "for u in $(awk -F: '$6 ~ \"^/var/vcap/bosh_ssh/\" {print $1}' /etc/passwd);"
                    ' do pkill -KILL -u "$u"; userdel -rf "$u"; done',
                    check=False,
                )


@pytest.fixture(scope="session")
def bosh_cli() -> Path:
    binary, output = cli.build()
    if binary is None:
        reason = f"real bosh CLI unavailable: {output}"
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return binary
