"""The store registry (`backups.stores`): each backend parses its own credentials from the
values it is given and names their source, never their content, in errors.

Why this test exists: the operator's Secrets and the CLI's environment go through the same
entry (`open_store`); the stores themselves are opened against real servers in
tests/integration/test_backups_s3.py and test_backups_azure.py.
"""

from __future__ import annotations

import pytest

from pgrecovery.backups.config import AzureLocation, S3Location
from pgrecovery.backups.stores import BACKENDS, open_store
from pgrecovery.errors import ConfigurationError, SecretError


def test_every_location_type_has_one_backend() -> None:
    assert set(BACKENDS) == {S3Location, AzureLocation}
    assert BACKENDS[S3Location].credentials_optional
    assert not BACKENDS[AzureLocation].credentials_optional


async def test_azure_without_credentials_is_refused_before_any_connection() -> None:
    with pytest.raises(ConfigurationError, match="no credentials"):
        await open_store(AzureLocation("backups", "https://acct.blob.core.windows.net"), None,
                         "Secret store")


async def test_incomplete_credentials_name_their_source_not_their_values() -> None:
    values = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEYID"}
    with pytest.raises(SecretError) as caught:
        await open_store(S3Location("backups"), values, "Secret ns/backup-store")
    assert "Secret ns/backup-store" in str(caught.value)
    assert "AWS_SECRET_ACCESS_KEY" in str(caught.value)
    assert "AKIAEXAMPLEKEYID" not in str(caught.value)


async def test_the_memory_store_fake_has_the_store_semantics_the_unit_tests_rely_on() -> None:
    from pgrecovery.adapters.objectstore import ObjectStore, WritableObjectStore  # noqa: PLC0415
    from pgrecovery.errors import BackupNotFound  # noqa: PLC0415
    from tests.memory_store import MemoryStore  # noqa: PLC0415

    store = MemoryStore({"b/2": b"two", "a/1": b"one", "b/10": b"ten"})
    assert isinstance(store, ObjectStore)
    assert isinstance(store, WritableObjectStore)
    assert [o.key for o in await store.list("b/")] == ["b/10", "b/2"]  # key order, as S3
    assert await store.read_range("a/1", 1, 3) == b"ne"
    with pytest.raises(BackupNotFound):
        await store.head("c/1")
    with pytest.raises(ValueError, match="outside"):
        await store.read_range("a/1", 0, 9)
    await store.copy("a/1", "c/1")
    assert await store.delete(["a/1", "zz"]) == 2
    assert sorted(store.objects) == ["b/10", "b/2", "c/1"]
