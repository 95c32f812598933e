"""Server-side archive clone for the Dingo recovery, against moto and a real SeaweedFS gateway.

The S3 adapter's `copy` (CopyObject, and boto3's multipart copy when the size is unknown or
above 5 GiB) and `delete` (DeleteObjects in batches of 1000), and `cluster.dingo_archive` on
top: emptying a prefix (also past one DeleteObjects page), cloning with counts, sizes and
ETags verified, and refusing overlapping prefixes. The case that makes `aws s3 sync` unsafe —
an object at the destination with the same key and the same size but other bytes — is
replaced by the clone, and an object the source does not have is reported, never kept
silently.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator

import pytest

from pgrecovery.adapters.s3 import S3ObjectStore
from pgrecovery.cluster.dingo_archive import clone_prefix, empty_prefix, verify_clone
from pgrecovery.errors import BackupIncomplete, BackupNotFound, FatalError
from tests.objectstores.servers import S3Server

pytestmark = pytest.mark.integration

OLD = "backups/6e101b27-ee1b-4f4d-a032-4401a3709ec3/wal/"
NEW = "backups/ca5a7d15-1422-4408-a00d-93194350a106/wal/"


@pytest.fixture(params=["moto_s3", "seaweedfs_s3"])
def server(request: pytest.FixtureRequest) -> S3Server:
    found: S3Server = request.getfixturevalue(request.param)
    return found


@pytest.fixture
async def store(server: S3Server) -> AsyncIterator[tuple[S3ObjectStore, S3Server, str]]:
    bucket = server.new_bucket("clone")
    s3 = await S3ObjectStore.create(
        bucket,
        region=server.region,
        endpoint_url=server.endpoint_url,
        access_key_id=server.access_key,
        secret_access_key=server.secret_key,
    )
    try:
        yield s3, server, bucket
    finally:
        await s3.close()


def _put(server: S3Server, bucket: str, objects: dict[str, bytes]) -> None:
    client = server.client()
    for key, body in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)


def _get(server: S3Server, bucket: str, key: str) -> bytes:
    body: bytes = server.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return body


async def test_clone_replaces_same_size_objects_and_verifies(
    store: tuple[S3ObjectStore, S3Server, str],
) -> None:
    s3, server, bucket = store
    big = os.urandom(6 * 1024 * 1024 + 17)
    source = {
        OLD + "sysids/sysid": b"7710721855278928014\n",
        OLD + "basebackups_005/base_000000010000000000000002_00000040/tar_partitions/"
        "part_00000000.tar.lzo": big,
        OLD + "wal_005/000000010000000000000002.lzo": b"old segment",
    }
    # The new instance's own objects: a sysid of the same length but another value (what a
    # sync keeps), and a segment of another size.
    _put(server, bucket, source)
    _put(
        server,
        bucket,
        {
            NEW + "sysids/sysid": b"7710721869515026708\n",
            NEW + "wal_005/000000010000000000000002.lzo": b"new",
        },
    )
    progress: list[tuple[int, int]] = []

    async def on_progress(done: int, total: int, _detail: str) -> None:
        progress.append((done, total))

    result = await clone_prefix(s3, OLD, NEW, progress=on_progress)
    assert result.copied == 3
    assert result.total.objects == 3
    assert result.total.bytes == sum(len(b) for b in source.values())
    assert progress[-1] == (result.total.bytes, result.total.bytes)
    for key, body in source.items():
        copy = _get(server, bucket, NEW + key[len(OLD) :])
        assert hashlib.sha256(copy).digest() == hashlib.sha256(body).digest(), key
    # a second run copies nothing and still verifies everything
    again = await clone_prefix(s3, OLD, NEW)
    assert again.copied == 0
    assert again.total == result.total
    # an object the source does not have is reported
    _put(server, bucket, {NEW + "basebackups_005/base_000000010000000000000009_00000040_"
                          "backup_stop_sentinel.json": b"{}"})  # fmt: skip
    with pytest.raises(BackupIncomplete, match="extra: 1"):
        await verify_clone(s3, OLD, NEW)


async def test_empty_prefix_deletes_everything_and_spares_the_source(
    store: tuple[S3ObjectStore, S3Server, str],
) -> None:
    s3, server, bucket = store
    _put(server, bucket, {OLD + "sysids/sysid": b"1\n", NEW + "sysids/sysid": b"2\n"})
    _put(server, bucket, {f"{NEW}wal_005/{i:024X}.lzo": b"x" for i in range(5)})
    removed = await empty_prefix(s3, NEW, protect=OLD)
    assert removed.objects == 6
    assert await s3.list(NEW) == []
    assert [o.key for o in await s3.list(OLD)] == [OLD + "sysids/sysid"]
    # emptying an empty prefix is a no-op
    assert (await empty_prefix(s3, NEW, protect=OLD)).objects == 0
    # overlapping prefixes are refused before anything is deleted
    with pytest.raises(FatalError, match="overlap"):
        await empty_prefix(s3, "backups/", protect=OLD)
    with pytest.raises(FatalError, match="overlap"):
        await clone_prefix(s3, OLD, OLD + "copy/")
    assert [o.key for o in await s3.list(OLD)] == [OLD + "sysids/sysid"]
    with pytest.raises(BackupNotFound):
        await clone_prefix(s3, NEW, "backups/elsewhere/wal/")


async def test_copy_without_a_size_uses_the_managed_copy(
    store: tuple[S3ObjectStore, S3Server, str],
) -> None:
    s3, server, bucket = store
    body = os.urandom(300_000)
    _put(server, bucket, {"a/obj": body})
    info = await s3.copy("a/obj", "b/obj")
    assert info.size == len(body)
    assert _get(server, bucket, "b/obj") == body
    # deleting absent keys counts them as deleted, like S3
    assert await s3.delete(["b/obj", "b/never-there"]) == 2
    assert await s3.list("b/") == []


async def test_delete_pages_past_one_thousand_keys(moto_s3: S3Server) -> None:
    bucket = moto_s3.new_bucket("clone")
    client = moto_s3.client()
    keys = [f"{NEW}wal_005/{i:024X}.lzo" for i in range(1005)]
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=b"")
    s3 = await S3ObjectStore.create(
        bucket,
        region=moto_s3.region,
        endpoint_url=moto_s3.endpoint_url,
        access_key_id=moto_s3.access_key,
        secret_access_key=moto_s3.secret_key,
    )
    try:
        removed = await empty_prefix(s3, NEW, protect=OLD)
        assert removed.objects == 1005
        assert await s3.list(NEW) == []
    finally:
        await s3.close()
