"""Session-scoped pytest fixtures for the object-store servers.

Import the fixtures you need into a test module (`from tests.objectstores.fixtures import
moto_s3`) or list this module in `pytest_plugins` of the top-level conftest. A missing server
binary skips the test with the install command, except under CI (`CI` set), where it fails:
a CI machine without the servers would otherwise pass by testing nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.objectstores.servers import (
    AzuriteServer,
    S3Server,
    ServerUnavailable,
    start_azurite,
    start_moto,
    start_seaweedfs,
)


def _unavailable(exc: ServerUnavailable) -> None:
    if os.environ.get("CI"):
        pytest.fail(str(exc), pytrace=False)
    pytest.skip(str(exc))


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[S3Server]:
    """moto's S3 server: quick, accepts any credentials."""
    try:
        server = start_moto()
    except ServerUnavailable as exc:
        _unavailable(exc)
        raise
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def seaweedfs_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real SeaweedFS S3 gateway: enforces SigV4, AWS-style ETags."""
    try:
        server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    except ServerUnavailable as exc:
        _unavailable(exc)
        raise
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzuriteServer]:
    """Azurite's blob service (in memory): checks SharedKey signatures."""
    try:
        server = start_azurite(tmp_path_factory.mktemp("azurite"))
    except ServerUnavailable as exc:
        _unavailable(exc)
        raise
    try:
        yield server
    finally:
        server.stop()
