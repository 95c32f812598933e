"""Object-store faults under the backups layer: real servers behind the fault proxy.

Every read path of a recovery — `download_backup` (resumable download), `StorePartsSource`
(ranged GETs straight into `decrypt_stream`) and `CachedStoreSource` (the streaming path that
keeps parts on the work volume) — reads a real a9s-style backup from moto or Azurite through
`tests/faults/proxy.py`, which injects what stores really do: S3 `SlowDown`/`InternalError`,
Azure `ServerBusy`, connections reset or cut half-way through a body, connections closed
without an answer, a server that never answers, a slow link.

What must hold:
- transient faults are retried and the dump is byte-for-byte the runbook's own
  `cat | openssl enc -d | gunzip` output (sha256 equal), each fault costing exactly one extra
  request (so no SDK retries hide behind ours);
- persistent faults, an unresolvable host and a closed port end in `StoreUnavailable` within a
  bounded time, with a message naming the endpoint and what failed, and no secret;
- the retry policy really backs off with full jitter and gives up after its attempts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pgrecovery.adapters.azure import AzureBlobStore
from pgrecovery.adapters.objectstore import ObjectStore
from pgrecovery.adapters.retry import RetryPolicy, retry_async
from pgrecovery.adapters.s3 import S3ObjectStore
from pgrecovery.backups.cached_source import CachedStoreSource
from pgrecovery.backups.config import EncryptionKey
from pgrecovery.backups.download import download_backup
from pgrecovery.backups.listing import Backup, list_backups, select_backup
from pgrecovery.backups.pipeline import decrypt_stream
from pgrecovery.backups.sources import CiphertextSource, LocalPartsSource, StorePartsSource
from pgrecovery.errors import RetryableError, StoreUnavailable
from tests.faults.proxy import (
    Fault,
    FaultProxy,
    azure_error,
    close,
    closed_port,
    fault_proxy,
    hang,
    reset_after,
    s3_error,
    throttle,
)
from tests.objectstores.a9sbackup import MadeBackup, make_backup, manual_decrypt, upload_azure
from tests.objectstores.a9sbackup import upload_s3 as upload_s3_parts
from tests.objectstores.dumpgen import write_dump
from tests.objectstores.servers import AzuriteServer, S3Server

pytestmark = pytest.mark.integration

GUID = "fa170000-0000-4000-8000-00000000fa17"
BACKUP_ID = f"{GUID}-1740200000000"
KEY = b"fault-proxy-test-key-7Qx9LmN2pR4s"
PART_SIZE = 48 * 1024
CHUNK = 32 * 1024  # ranges smaller than parts: faults land in the middle of parts too
# Quick retries for tests; the default policy's timing is checked on its own below.
FAST = RetryPolicy(attempts=6, base_delay=0.02, max_delay=0.2)


@dataclass(frozen=True)
class Corpus:
    parts: MadeBackup
    single: MadeBackup
    expected_sha256: str
    expected_size: int


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("faultcorpus")
    key_file = root / "key"
    key_file.write_bytes(KEY + b"\n")
    plain = root / "dump.sql"
    write_dump(plain, 1_200_000, seed=21)
    parts = make_backup(plain, root / "parts", BACKUP_ID, key_file, part_size=PART_SIZE)
    single = make_backup(plain, root / "single", BACKUP_ID, key_file, part_size=None)
    manual_decrypt(parts.files, key_file, root / "expected.sql")
    expected = (root / "expected.sql").read_bytes()
    assert len(parts.files) >= 4  # faults must be able to land in a middle part
    return Corpus(parts, single, hashlib.sha256(expected).hexdigest(), len(expected))


@pytest.fixture(scope="module")
def s3_bucket(moto_s3: S3Server, corpus: Corpus) -> str:
    bucket = moto_s3.new_bucket("faults")
    upload_s3_parts(moto_s3.client(), bucket, corpus.parts)
    return bucket


@pytest.fixture(scope="module")
def azure_container(azurite: AzuriteServer, corpus: Corpus) -> str:
    container = azurite.new_container("faults")
    upload_azure(azurite.service().get_container_client(container), corpus.single)
    return container


@pytest.fixture
def s3_proxy(moto_s3: S3Server) -> Iterator[FaultProxy]:
    with fault_proxy(moto_s3.endpoint_url) as proxy:
        yield proxy


@pytest.fixture
def azure_proxy(azurite: AzuriteServer) -> Iterator[FaultProxy]:
    with fault_proxy(azurite.account_url) as proxy:
        yield proxy


async def _s3(
    endpoint: str, bucket: str, server: S3Server, *, timeout: float = 10.0
) -> S3ObjectStore:
    return await S3ObjectStore.create(
        bucket,
        region=server.region,
        endpoint_url=endpoint,
        access_key_id=server.access_key,
        secret_access_key=server.secret_key,
        connect_timeout=timeout,
        read_timeout=timeout,
    )


def _azure(
    account_url: str, container: str, server: AzuriteServer, *, timeout: float = 10.0
) -> AzureBlobStore:
    return AzureBlobStore.from_account_url(
        account_url,
        container,
        account_name=server.account_name,
        account_key=server.account_key,
        connect_timeout=timeout,
        read_timeout=timeout,
    )


async def _backup(store: ObjectStore) -> Backup:
    return select_backup(await list_backups(store, GUID, retry=FAST))


async def _sha_of(source: CiphertextSource) -> tuple[str, int]:
    hasher = hashlib.sha256()
    size = 0
    async for piece in decrypt_stream(source, EncryptionKey.from_bytes(KEY)):
        hasher.update(piece)
        size += len(piece)
    return hasher.hexdigest(), size


async def _read_via(path: str, store: ObjectStore, backup: Backup, work: Path) -> tuple[str, int]:
    """The plain dump's sha256 and size, read the way `path` names."""
    if path == "download":
        result = await download_backup(
            store, backup, work, concurrency=4, range_size=CHUNK, retry=FAST
        )
        return await _sha_of(LocalPartsSource.for_backup(backup, result.directory))
    if path == "stream":
        return await _sha_of(StorePartsSource(store, backup, chunk_size=CHUNK, retry=FAST))
    source = CachedStoreSource(store, backup, work, chunk_size=CHUNK, retry=FAST)
    digest = await _sha_of(source)
    # The streaming path keeps every part on the work volume, complete, for a restart.
    assert all((work / p.name).stat().st_size == p.size for p in backup.parts)
    return digest


def _ranges(backup: Backup, chunk: int) -> int:
    return sum(-(-p.size // chunk) for p in backup.parts)


TRANSIENT_S3: dict[str, Callable[[], Fault]] = {
    "slowdown-503": lambda: s3_error("SlowDown", 503, times=3, ranged=True, skip=2),
    "internal-500": lambda: s3_error("InternalError", 500, times=2, ranged=True, skip=5),
    "reset-mid-body": lambda: reset_after(5000, times=3, ranged=True, skip=4),
    "truncated-body": lambda: reset_after(7000, rst=False, times=2, ranged=True, skip=6),
    "closed-no-answer": lambda: close(times=2, ranged=True, skip=3),
    "first-request": lambda: s3_error("SlowDown", 503, times=2, ranged=True),
}


@pytest.mark.parametrize("path", ["download", "stream", "cached"])
@pytest.mark.parametrize("fault_name", list(TRANSIENT_S3))
async def test_transient_s3_fault_is_retried_and_bytes_are_identical(
    fault_name: str,
    path: str,
    moto_s3: S3Server,
    s3_bucket: str,
    s3_proxy: FaultProxy,
    corpus: Corpus,
    tmp_path: Path,
) -> None:
    store = await _s3(s3_proxy.url, s3_bucket, moto_s3)
    try:
        backup = await _backup(store)
        fault = TRANSIENT_S3[fault_name]()
        s3_proxy.add(fault)
        sha, size = await _read_via(path, store, backup, tmp_path / "work")
    finally:
        await store.close()
    assert (sha, size) == (corpus.expected_sha256, corpus.expected_size)
    assert fault.applied == fault.times
    # One extra request per injected fault, and no more: botocore does not retry behind us.
    head_reads = 0 if path == "download" else 1  # check_key reads the first block
    head_reads += 1 if backup.metadata_key else 0  # the listing reads <id>.json (a GET too)
    assert s3_proxy.count(ranged=True, action="forward") == _ranges(backup, CHUNK) + head_reads
    assert s3_proxy.count(ranged=True) == _ranges(backup, CHUNK) + head_reads + fault.times


async def test_transient_listing_faults_are_retried(
    moto_s3: S3Server, s3_bucket: str, s3_proxy: FaultProxy
) -> None:
    store = await _s3(s3_proxy.url, s3_bucket, moto_s3)
    s3_proxy.add(s3_error("SlowDown", 503, times=2, method="GET", ranged=False))
    s3_proxy.add(close(times=1, method="GET", ranged=False))
    try:
        backup = await _backup(store)
    finally:
        await store.close()
    assert backup.backup_id == BACKUP_ID
    assert s3_proxy.count(ranged=False, action="forward") == 1
    assert s3_proxy.count(ranged=False) == 4


async def test_throttled_link_still_gives_identical_bytes(
    moto_s3: S3Server, s3_bucket: str, s3_proxy: FaultProxy, corpus: Corpus, tmp_path: Path
) -> None:
    rate = 400_000  # bytes per second and connection
    read_ahead = 4
    store = await _s3(s3_proxy.url, s3_bucket, moto_s3)
    try:
        backup = await _backup(store)
        s3_proxy.add(throttle(rate, ranged=True))
        source = StorePartsSource(store, backup, chunk_size=CHUNK, read_ahead=read_ahead)
        started = time.monotonic()
        sha, _ = await _sha_of(source)
        elapsed = time.monotonic() - started
    finally:
        await store.close()
    assert sha == corpus.expected_sha256
    assert s3_proxy.count(action="throttle") == _ranges(backup, CHUNK) + 1
    # The throttle really held: at most `read_ahead` connections at `rate` each.
    assert elapsed >= backup.total_size / (rate * read_ahead) * 0.9


@pytest.mark.parametrize(
    "fault_name",
    ["server-busy", "internal-500", "reset-mid-body", "closed-no-answer"],
)
@pytest.mark.parametrize("path", ["stream", "cached"])
async def test_transient_azure_fault_is_retried_and_bytes_are_identical(
    fault_name: str,
    path: str,
    azurite: AzuriteServer,
    azure_container: str,
    azure_proxy: FaultProxy,
    corpus: Corpus,
    tmp_path: Path,
) -> None:
    fault = {
        "server-busy": lambda: azure_error("ServerBusy", 503, times=3, ranged=True, skip=2),
        "internal-500": lambda: azure_error("InternalError", 500, times=2, ranged=True, skip=4),
        "reset-mid-body": lambda: reset_after(6000, times=2, ranged=True, skip=3),
        "closed-no-answer": lambda: close(times=2, ranged=True, skip=3),
    }[fault_name]()
    store = _azure(azure_proxy.url_for(azurite.account_url), azure_container, azurite)
    try:
        backup = await _backup(store)
        azure_proxy.add(fault)
        sha, size = await _read_via(path, store, backup, tmp_path / "work")
    finally:
        await store.close()
    assert (sha, size) == (corpus.expected_sha256, corpus.expected_size)
    assert fault.applied == fault.times
    if fault_name != "reset-mid-body":
        # retry_total=0 holds: one extra request per fault. (A body cut mid-download is the
        # exception: azure-storage-blob re-requests the rest inside readall() on its own.)
        ranges = _ranges(backup, CHUNK) + 1  # + the key check's read of the first block
        assert azure_proxy.count(ranged=True, action="forward") == ranges
        assert azure_proxy.count(ranged=True) == ranges + fault.times


# ---------------------------------------------------------------- persistent faults


def _assert_clean(message: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in message


@pytest.mark.parametrize("path", ["download", "stream", "cached"])
async def test_persistent_slowdown_mid_backup_ends_in_store_unavailable(
    path: str,
    moto_s3: S3Server,
    s3_bucket: str,
    s3_proxy: FaultProxy,
    tmp_path: Path,
) -> None:
    store = await _s3(s3_proxy.url, s3_bucket, moto_s3)
    try:
        backup = await _backup(store)
        fault = s3_error("SlowDown", 503, times=None, ranged=True, skip=6)
        s3_proxy.add(fault)
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as caught:
            await _read_via(path, store, backup, tmp_path / "work")
        elapsed = time.monotonic() - started
    finally:
        await store.close()
    message = str(caught.value)
    assert "SlowDown" in message
    assert s3_proxy.url in message  # names the endpoint
    assert f"s3://{s3_bucket}/{GUID}" in message  # and the object that failed
    _assert_clean(message, moto_s3.secret_key, KEY.decode())
    # Bounded: FAST allows 6 attempts per range, ~1 s of backoff at most.
    assert elapsed < 15
    # The failing range was tried exactly `attempts` times by us and never behind our back.
    assert fault.applied >= FAST.attempts
    if path == "stream":
        assert fault.applied <= FAST.attempts * 4  # only the ranges in flight (read-ahead 4)
    assert isinstance(caught.value, RetryableError)  # the engine retries the phase later


async def test_store_that_never_answers_times_out_and_gives_up(
    moto_s3: S3Server, s3_bucket: str, s3_proxy: FaultProxy
) -> None:
    store = await _s3(s3_proxy.url, s3_bucket, moto_s3, timeout=1.0)
    policy = RetryPolicy(attempts=3, base_delay=0.05, max_delay=0.1)
    try:
        backup = await _backup(store)
        s3_proxy.add(hang(times=None, ranged=True))
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="Read timeout") as caught:
            await _sha_of(StorePartsSource(store, backup, chunk_size=CHUNK, retry=policy))
        elapsed = time.monotonic() - started
    finally:
        await store.close()
    assert s3_proxy.url in str(caught.value)
    assert s3_proxy.count(action="hang") == policy.attempts  # the head read, 3 times
    assert 3 * 1.0 <= elapsed < 15


async def test_azure_persistent_server_busy_ends_in_store_unavailable(
    azurite: AzuriteServer, azure_container: str, azure_proxy: FaultProxy, tmp_path: Path
) -> None:
    store = _azure(azure_proxy.url_for(azurite.account_url), azure_container, azurite)
    try:
        backup = await _backup(store)
        fault = azure_error("ServerBusy", 503, times=None, ranged=True, skip=5)
        azure_proxy.add(fault)
        with pytest.raises(StoreUnavailable, match="ServerBusy") as caught:
            await _read_via("cached", store, backup, tmp_path / "work")
    finally:
        await store.close()
    message = str(caught.value)
    assert f"azure://{azurite.account_name}/{azure_container}/{BACKUP_ID}" in message
    _assert_clean(message, azurite.account_key, KEY.decode())
    assert fault.applied >= FAST.attempts


async def test_azure_store_that_never_answers_times_out(
    azurite: AzuriteServer, azure_container: str, azure_proxy: FaultProxy
) -> None:
    store = _azure(azure_proxy.url_for(azurite.account_url), azure_container, azurite, timeout=1)
    policy = RetryPolicy(attempts=2, base_delay=0.05, max_delay=0.1)
    try:
        backup = await _backup(store)
        azure_proxy.add(hang(times=None, ranged=True))
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="timed out"):
            await _sha_of(StorePartsSource(store, backup, chunk_size=CHUNK, retry=policy))
        elapsed = time.monotonic() - started
    finally:
        await store.close()
    assert azure_proxy.count(action="hang") == policy.attempts
    assert elapsed < 15


@pytest.mark.parametrize("kind", ["dns", "closed-port"])
async def test_unreachable_s3_endpoint_is_named_and_bounded(
    kind: str, moto_s3: S3Server, s3_bucket: str
) -> None:
    endpoint = "http://store.invalid:9000" if kind == "dns" else f"http://127.0.0.1:{closed_port()}"
    store = await _s3(endpoint, s3_bucket, moto_s3, timeout=2.0)
    started = time.monotonic()
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await list_backups(store, GUID, retry=FAST)
    finally:
        await store.close()
    message = str(caught.value)
    assert endpoint in message
    assert "Could not connect" in message
    _assert_clean(message, moto_s3.secret_key)
    assert time.monotonic() - started < 15


@pytest.mark.parametrize("kind", ["dns", "closed-port"])
async def test_unreachable_azure_endpoint_is_named_and_bounded(
    kind: str, azurite: AzuriteServer, azure_container: str
) -> None:
    host = "store.invalid:10000" if kind == "dns" else f"127.0.0.1:{closed_port()}"
    store = _azure(f"http://{host}/{azurite.account_name}", azure_container, azurite, timeout=2)
    started = time.monotonic()
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await list_backups(store, GUID, retry=FAST)
    finally:
        await store.close()
    message = str(caught.value)
    assert host.split(":", maxsplit=1)[0] in message
    _assert_clean(message, azurite.account_key)
    assert time.monotonic() - started < 15


# ---------------------------------------------------------------- the retry policy itself


async def test_default_policy_backs_off_with_full_jitter_and_gives_up(
    moto_s3: S3Server, s3_bucket: str, s3_proxy: FaultProxy
) -> None:
    """The production policy (no test shortcut) against a store that always says SlowDown:
    one HTTP request per attempt, jittered growing waits within their caps, then the last
    error unchanged."""
    store = await _s3(s3_proxy.url, s3_bucket, moto_s3)
    policy = RetryPolicy()
    delays: list[float] = []

    async def record(delay: float) -> None:
        delays.append(delay)

    key = f"{BACKUP_ID}-0"
    s3_proxy.add(s3_error("SlowDown", 503, times=None))
    try:
        with pytest.raises(StoreUnavailable, match="SlowDown"):
            await retry_async(
                lambda: store.read_range(key, 0, 100), policy, what="probe", sleep=record
            )
    finally:
        await store.close()
    assert s3_proxy.count() == policy.attempts
    assert len(delays) == policy.attempts - 1
    caps = [min(policy.max_delay, policy.base_delay * 2**i) for i in range(len(delays))]
    assert all(0 <= d <= cap for d, cap in zip(delays, caps, strict=True))
    assert len(set(delays)) == len(delays)  # jittered, not a fixed schedule
    assert sum(delays) <= sum(caps) == 15.5  # a dead store is reported within ~16 s per range


async def test_retry_after_from_the_store_is_honoured(
    moto_s3: S3Server, s3_bucket: str, s3_proxy: FaultProxy
) -> None:
    store = await _s3(s3_proxy.url, s3_bucket, moto_s3)
    delays: list[float] = []

    async def record(delay: float) -> None:
        delays.append(delay)

    busy = s3_error("SlowDown", 503, times=1)
    s3_proxy.add(dataclasses.replace(busy, headers=(*busy.headers, ("Retry-After", "7"))))
    try:
        data = await retry_async(
            lambda: store.read_range(f"{BACKUP_ID}-0", 0, 8),
            RetryPolicy(),
            what="probe",
            sleep=record,
        )
    finally:
        await store.close()
    assert data == b"Salted__"
    assert delays == [7.0]
