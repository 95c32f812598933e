"""The decrypt pipeline, download and retries on local files (real gzip/openssl/split).

The object-store servers are exercised in tests/integration; here the store is a directory
(`LocalDirStore`), optionally wrapped to fail like a throttling store.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pgrecovery.adapters.objectstore import ObjectStore
from pgrecovery.adapters.retry import RetryPolicy, retry_async
from pgrecovery.backups.config import EncryptionKey
from pgrecovery.backups.download import download_backup, part_is_complete
from pgrecovery.backups.listing import list_backups, select_backup
from pgrecovery.backups.localstore import LocalDirStore
from pgrecovery.backups.pipeline import decrypt_stream
from pgrecovery.backups.progress import Progress, human_size
from pgrecovery.backups.sink import write_stream_to_file
from pgrecovery.backups.sources import LocalPartsSource, StorePartsSource
from pgrecovery.errors import BackupCorrupt, BackupIncomplete, StoreUnavailable, WrongKey
from tests.memory_store import WrappedStore
from tests.objectstores.a9sbackup import MadeBackup, make_backup, manual_decrypt
from tests.objectstores.dumpgen import write_dump

pytestmark = pytest.mark.unit

G = "0a1b2c3d-1111-2222-3333-444455556666"
BID = f"{G}-1700000000000"
KEY = b"unit-test-key"
FAST = RetryPolicy(attempts=4, base_delay=0.001, max_delay=0.002)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[MadeBackup, Path, bytes]:
    root = tmp_path_factory.mktemp("pipeline")
    plain = root / "dump.sql"
    write_dump(plain, 600_000, seed=3)
    key_file = root / "key"
    key_file.write_bytes(KEY + b"\n")
    backup = make_backup(plain, root / "store", BID, key_file, part_size=10_000)
    expected = root / "expected.sql"
    manual_decrypt(backup.files, key_file, expected)
    return backup, key_file, expected.read_bytes()


async def _collect(stream: AsyncIterator[bytes]) -> bytes:
    return b"".join([piece async for piece in stream])


def _source(backup: MadeBackup, chunk: int = 1 << 20) -> LocalPartsSource:
    return LocalPartsSource(list(backup.files), backup_id=backup.backup_id, chunk_size=chunk)


def test_fixture_has_many_parts_in_natural_order(made: tuple[MadeBackup, Path, bytes]) -> None:
    backup, _, _ = made
    assert len(backup.files) >= 12
    assert backup.files[10].name.endswith("-10")


@pytest.mark.parametrize("chunk", [7, 4096, 1 << 20])
async def test_local_parts_decrypt_equals_manual_pipeline(
    made: tuple[MadeBackup, Path, bytes], chunk: int
) -> None:
    backup, _, expected = made
    seen: list[Progress] = []
    out = await _collect(
        decrypt_stream(
            _source(backup, chunk), EncryptionKey.from_bytes(KEY), progress=seen.append,
            out_chunk=65536,
        )
    )  # fmt: skip
    assert out == expected
    assert seen[-1].parts_done == seen[-1].parts_total == len(backup.files)
    assert seen[-1].bytes_done == seen[-1].bytes_total
    assert seen[-1].output_bytes == len(expected)


async def test_zlib_fallback_gives_the_same_bytes(made: tuple[MadeBackup, Path, bytes]) -> None:
    backup, _, expected = made
    stream = decrypt_stream(_source(backup), EncryptionKey.from_bytes(KEY), use_isal=False)
    assert await _collect(stream) == expected


async def test_store_source_streams_with_read_ahead(made: tuple[MadeBackup, Path, bytes]) -> None:
    backup, _, expected = made
    store = LocalDirStore(backup.files[0].parent)
    chosen = select_backup(await list_backups(store, G))
    source = StorePartsSource(store, chosen, chunk_size=3000, read_ahead=3, queued=1)
    assert await _collect(decrypt_stream(source, EncryptionKey.from_bytes(KEY))) == expected


class IntoStore(WrappedStore):
    """A store with `read_range_into` (like the S3 and Azure adapters) that records the buffers
    it was given and how many reads were in flight at once."""

    def __init__(self, inner: LocalDirStore) -> None:
        super().__init__(inner)
        self.buffers: set[int] = set()
        self.inflight = 0
        self.max_inflight = 0

    async def read_range_into(self, key: str, start: int, buffer: memoryview) -> None:
        self.buffers.add(id(buffer.obj))
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            await asyncio.sleep(0)  # let the other reads start
            buffer[:] = await self.inner.read_range(key, start, start + len(buffer))
        finally:
            self.inflight -= 1


async def test_store_source_reuses_a_fixed_set_of_buffers(
    made: tuple[MadeBackup, Path, bytes],
) -> None:
    """Every range is read into one of read_ahead + queued buffers allocated once, and a buffer
    is refilled only after the decrypt thread has moved on: the bytes still come out right."""
    backup, _, expected = made
    store = IntoStore(LocalDirStore(backup.files[0].parent))
    chosen = select_backup(await list_backups(store, G))
    source = StorePartsSource(store, chosen, chunk_size=4096, read_ahead=3, queued=2)
    assert chosen.total_size > 20 * 4096  # many more ranges than buffers
    assert await _collect(decrypt_stream(source, EncryptionKey.from_bytes(KEY))) == expected
    assert len(store.buffers) == 5
    assert store.max_inflight == 3
    assert source.buffer_bytes == 5 * 4096


async def test_write_stream_to_file_returns_size_and_sha256(
    made: tuple[MadeBackup, Path, bytes], tmp_path: Path
) -> None:
    backup, _, expected = made
    target = tmp_path / "out.dump"
    written = await write_stream_to_file(
        decrypt_stream(_source(backup), EncryptionKey.from_bytes(KEY)), target
    )
    assert written.size == len(expected)
    assert written.sha256 == hashlib.sha256(expected).hexdigest()
    assert target.read_bytes() == expected
    assert not (tmp_path / "out.dump.partial").exists()


async def test_wrong_key_before_any_output(made: tuple[MadeBackup, Path, bytes]) -> None:
    backup, _, _ = made
    with pytest.raises(WrongKey, match="first block is not gzip"):
        await _collect(decrypt_stream(_source(backup), EncryptionKey.from_bytes(b"nope")))


async def test_flipped_byte_in_middle_part(
    made: tuple[MadeBackup, Path, bytes], tmp_path: Path
) -> None:
    backup, _, _ = made
    files = [tmp_path / f.name for f in backup.files]
    for src, dst in zip(backup.files, files, strict=True):
        dst.write_bytes(src.read_bytes())
    middle = bytearray(files[6].read_bytes())
    middle[5000] ^= 0x01
    files[6].write_bytes(middle)
    target = tmp_path / "out.dump"
    with pytest.raises(BackupCorrupt, match="damaged in storage or in transfer"):
        await write_stream_to_file(
            decrypt_stream(LocalPartsSource(files), EncryptionKey.from_bytes(KEY)), target
        )
    assert not target.exists()
    assert not (tmp_path / "out.dump.partial").exists()


async def test_truncated_last_part(made: tuple[MadeBackup, Path, bytes], tmp_path: Path) -> None:
    backup, _, _ = made
    files = [tmp_path / f.name for f in backup.files]
    for src, dst in zip(backup.files, files, strict=True):
        dst.write_bytes(src.read_bytes())
    for cut, error, text in [
        (100, BackupIncomplete, "not a multiple of the AES block size"),
        (32, BackupCorrupt, "PKCS#7 padding"),
    ]:
        files[-1].write_bytes(backup.files[-1].read_bytes()[:-cut])
        with pytest.raises(error, match=text):
            await _collect(decrypt_stream(LocalPartsSource(files), EncryptionKey.from_bytes(KEY)))


async def test_closing_early_stops_the_worker_threads(
    made: tuple[MadeBackup, Path, bytes],
) -> None:
    backup, _, _ = made
    before = set(threading.enumerate())
    stream = decrypt_stream(_source(backup, 1024), EncryptionKey.from_bytes(KEY), out_chunk=1024)
    async for _ in stream:
        break
    await stream.aclose()  # type: ignore[attr-defined]
    await asyncio.sleep(0)
    leftover = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not [t for t in leftover if t.name.startswith(("decrypt", "gunzip"))]


class FlakyStore(WrappedStore):
    """Wraps a store; the first `fail_times` reads of every `fail_every`-th range fail as a
    throttling store does (StoreUnavailable)."""

    def __init__(self, inner: ObjectStore, fail_every: int, fail_times: int = 2) -> None:
        super().__init__(inner)
        self.fail_every = fail_every
        self.fail_times = fail_times
        self.attempts: dict[tuple[str, int], int] = {}
        self.calls = 0
        self.failures = 0

    async def read_range(self, key: str, start: int, end: int) -> bytes:
        self.calls += 1
        n = self.attempts[key, start] = self.attempts.get((key, start), 0) + 1
        if len(self.attempts) % self.fail_every == 0 and n <= self.fail_times:
            self.failures += 1
            raise StoreUnavailable("SlowDown: please reduce your request rate")
        return await self.inner.read_range(key, start, end)


async def test_download_retries_resumes_and_decrypts(
    made: tuple[MadeBackup, Path, bytes], tmp_path: Path
) -> None:
    backup, _, expected = made
    store = FlakyStore(LocalDirStore(backup.files[0].parent), fail_every=3)
    chosen = select_backup(await list_backups(store, G))
    seen: list[Progress] = []
    work = tmp_path / "work"
    result = await download_backup(
        store, chosen, work, concurrency=4, range_size=4000, retry=FAST, progress=seen.append
    )
    assert store.failures > 0
    assert result.fetched_parts == chosen.part_count
    assert seen[-1] == Progress(
        chosen.total_size, chosen.total_size, chosen.part_count, chosen.part_count
    )
    assert all(part_is_complete(work, p) for p in chosen.parts)
    assert not list(work.glob("*.partial"))

    # Resume: nothing is fetched again; a part whose record is gone is fetched again.
    again = await download_backup(store, chosen, work, retry=FAST)
    assert (again.fetched_parts, again.skipped_parts) == (0, chosen.part_count)
    (work / (chosen.parts[4].name + ".done.json")).unlink()
    (work / chosen.parts[4].name).write_bytes(b"half")
    third = await download_backup(store, chosen, work, retry=FAST)
    assert (third.fetched_parts, third.bytes_fetched) == (1, chosen.parts[4].size)

    assert await _collect(decrypt_stream(third.source(), EncryptionKey.from_bytes(KEY))) == expected


async def test_download_gives_up_after_the_policy(
    made: tuple[MadeBackup, Path, bytes], tmp_path: Path
) -> None:
    backup, _, _ = made
    local = LocalDirStore(backup.files[0].parent)
    store = FlakyStore(local, fail_every=1, fail_times=99)
    # Listed through the good store: the listing reads <id>.json, which would fail first.
    chosen = select_backup(await list_backups(local, G))
    with pytest.raises(StoreUnavailable, match="SlowDown"):
        await download_backup(store, chosen, tmp_path / "w", retry=FAST)
    assert store.calls >= FAST.attempts


async def test_retry_policy_backs_off_with_jitter() -> None:
    delays: list[float] = []
    calls = 0

    async def op() -> str:
        nonlocal calls
        calls += 1
        if calls < 4:
            raise StoreUnavailable("503")
        return "ok"

    async def fake_sleep(d: float) -> None:
        delays.append(d)

    policy = RetryPolicy(attempts=5, base_delay=1.0, max_delay=3.0)
    assert await retry_async(op, policy, what="x", sleep=fake_sleep) == "ok"
    assert len(delays) == 3
    assert all(0 <= d <= cap for d, cap in zip(delays, [1.0, 2.0, 3.0], strict=True))


def test_human_size() -> None:
    assert human_size(512) == "512 B"
    assert human_size(1536) == "1.5 KiB"
    assert human_size(3 * 1024**3) == "3.0 GiB"
