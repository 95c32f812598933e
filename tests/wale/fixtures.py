"""pytest fixtures of the WAL-E test world (registered once in tests/conftest.py).

- `wale_s3` (session): moto's S3 server on the session sim cluster's bridge address
  (`<subnet>.1`), so that PostgreSQL's archive_command inside the VMs reaches it; the host
  (operator, tests) reaches it there too.
- `wale_store` (session): an `ArchiveTarget` on a session bucket, for a session service GUID;
  `.for_service(guid)` gives another prefix on the same bucket.
- `wale_sim_cluster` (session): `sim_cluster` with WAL archiving switched on for the primary,
  archiving into `wale_store`'s prefix.
- `wale_archive` (function): a fresh archive under a new service GUID with one base backup
  (`simarchive.WaleArchive`); afterwards archiving goes back to the session prefix.

Never import this module from a test module (a second import would start a second session
cluster); import helpers from `tests.wale.archive`, `tests.wale.simarchive`, `tests.wale.faults`.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator

import pytest

from tests.objectstores.servers import S3Server, start_moto
from tests.simcluster.cluster import SimCluster

from .archive import ArchiveTarget
from .simarchive import (
    WaleArchive,
    ensure_archiving,
    set_archive_target,
    start_fresh_archive,
    switch_off_archiving,
)


@pytest.fixture(scope="session")
def wale_s3(sim_cluster: SimCluster) -> Iterator[S3Server]:
    """moto S3 on the bridge address of the session sim cluster."""
    server = start_moto(host=sim_cluster.config.host_address)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def wale_store(wale_s3: S3Server) -> ArchiveTarget:
    """Where WAL-E archives go in this session: bucket `wale-<random>`, a session GUID.
    Random credentials (moto accepts any), so a test can look for the secret in places it
    must not be."""
    return ArchiveTarget(
        endpoint_url=wale_s3.endpoint_url,
        bucket=wale_s3.new_bucket("wale"),
        service_guid=str(uuid.uuid4()),
        access_key="AKWALE" + secrets.token_hex(7).upper(),
        secret_key="wale-" + secrets.token_urlsafe(24),
        region=wale_s3.region,
    )


@pytest.fixture(scope="session")
def wale_sim_cluster(sim_cluster: SimCluster, wale_store: ArchiveTarget) -> Iterator[SimCluster]:
    """The session cluster, archiving WAL from its primary into `wale_store`'s prefix."""
    ensure_archiving(sim_cluster, wale_store)
    try:
        yield sim_cluster
    finally:
        # The S3 server stops before the cluster: archiving must not fail meanwhile.
        switch_off_archiving(sim_cluster)


@pytest.fixture
def wale_archive(
    wale_sim_cluster: SimCluster, healthy_sim_cluster: SimCluster, wale_store: ArchiveTarget
) -> Iterator[WaleArchive]:
    """A new service GUID's archive: archiving on into it, one base backup taken (after any
    fault an earlier test left is healed and after a rebuild re-applies archiving)."""
    archive = start_fresh_archive(healthy_sim_cluster, wale_store)
    try:
        yield archive
    finally:
        set_archive_target(healthy_sim_cluster, wale_store)
