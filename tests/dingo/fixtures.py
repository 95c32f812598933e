"""pytest fixtures for the simulated Dingo cell.

One cell per test session (like the a9s cluster): `dingo_cell`, with containers reaching the
session's moto S3 server through a relay on the cell's bridge address. Name and subnet come
from PGSIM_DINGO_NAME / PGSIM_DINGO_SUBNET (defaults `pgdingo` on 10.77.4.0/24), so two
sessions side by side use two cells.
"""

from __future__ import annotations

import os
import secrets
import urllib.parse
from collections.abc import Iterator

import pytest

from tests.dingo.cell import DingoCell, TcpRelay, cell_config
from tests.objectstores.servers import S3Server
from tests.simcluster.fixtures import skip_unless_simcluster_possible


@pytest.fixture(scope="session")
def dingo_cell(moto_s3: S3Server) -> Iterator[DingoCell]:
    """A running Dingo cell (cell/0: etcd, sshd, docker stand-in), no instances yet."""
    skip_unless_simcluster_possible()
    cell = DingoCell(
        cell_config(
            os.environ.get("PGSIM_DINGO_NAME", "pgdingo"),
            os.environ.get("PGSIM_DINGO_SUBNET", "10.77.4"),
        )
    )
    cell.up(lock_wait_s=float(os.environ.get("PGSIM_LOCK_WAIT_S", "300")))
    relay = None
    try:
        target = urllib.parse.urlsplit(moto_s3.endpoint_url)
        relay = TcpRelay(cell.config.host_address, (target.hostname or "", target.port or 80))
        cell.s3_endpoint = relay.url
        # moto accepts any keys: the containers get their own distinctive ones, so a test can
        # tell that the operator never shows what it reads from `docker inspect`.
        cell.s3_credentials = (
            "AKDINGO" + secrets.token_hex(6).upper(),
            "dingo-container-" + secrets.token_urlsafe(24),
        )
        yield cell
    finally:
        cell.down()
        if relay is not None:
            relay.close()
