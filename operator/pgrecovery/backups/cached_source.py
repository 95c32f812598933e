"""Stream a backup from the object store while keeping each part on the work volume.

Why this module exists: the recovery used to download every part first and decrypt afterwards,
so Fetching + Decrypting took the *sum* of both. This source feeds the decrypt pipeline straight
from the store (ranged GETs with read-ahead, `StorePartsSource`) and writes each part to the work
directory as it passes, in the same format as `download_backup` (`<name>` + `<name>.done.json`
with key, size and ETag). The whole fetch → decrypt → gunzip → upload chain therefore runs as one
pipeline with bounded buffers and takes about as long as its slowest stage, while a restart
still does not fetch a finished part again: parts already complete in the directory are read
from disk, only the others come from the store.

Decisions:
- The copy is written on the decrypt thread with `pwrite` before the chunk is handed on: a few
  hundred MB/s of page-cache writes cost far less than the decryption itself, and doing it
  there needs no extra buffer or thread.
- A part that was interrupted half-way is fetched again from its start (its `.partial` file is
  truncated): the unit of resume stays a part, as in `download.py`.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path

from pgrecovery.adapters.objectstore import ObjectStore
from pgrecovery.adapters.retry import RetryPolicy, retry_async
from pgrecovery.backups.download import PartWriter, part_is_complete
from pgrecovery.backups.listing import Backup
from pgrecovery.backups.sources import (
    LOCAL_CHUNK,
    CiphertextSource,
    SourceCancelled,
    SourcePart,
    StorePartsSource,
)
from pgrecovery.errors import BackupIncomplete

# 8 MiB ranges, 6 in flight + 2 queued: eight 8 MiB buffers (64 MiB, allocated once), enough
# to keep a fast store busy while the decryptor works (measured: the store is not the slow
# stage with 4 x 4 MiB, but a remote S3 has more latency than the test servers).
CACHED_CHUNK = 8 << 20
CACHED_READ_AHEAD = 6


class CachedStoreSource(CiphertextSource):
    """Parts from the work directory when complete there, otherwise from the store (and kept)."""

    def __init__(
        self,
        store: ObjectStore,
        backup: Backup,
        directory: Path,
        *,
        chunk_size: int = CACHED_CHUNK,
        read_ahead: int = CACHED_READ_AHEAD,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.store = store
        self.backup = backup
        self.backup_id = backup.backup_id
        self.directory = directory
        self.parts = tuple(SourcePart(p.name, p.size) for p in backup.parts)
        self._retry = retry or RetryPolicy()
        self.cached = tuple(part_is_complete(directory, p) for p in backup.parts)
        missing = tuple(p for p, done in zip(backup.parts, self.cached, strict=True) if not done)
        self._remote = (
            StorePartsSource(
                store,
                dataclasses.replace(backup, parts=missing),
                chunk_size=chunk_size,
                read_ahead=read_ahead,
                retry=self._retry,
            )
            if missing
            else None
        )
        # Read by the progress reporter on the loop thread; plain ints are safe to share.
        self.fetched_bytes = 0
        self.reused_bytes = 0

    @property
    def reused_parts(self) -> int:
        return sum(self.cached)

    async def read_head(self, n: int) -> bytes:
        out = b""
        for part, cached in zip(self.backup.parts, self.cached, strict=True):
            take = min(n - len(out), part.size)
            if take > 0:
                if cached:
                    with (self.directory / part.name).open("rb") as f:
                        out += f.read(take)
                else:
                    out += await self._read_from_store(part.key, take)
            if len(out) >= n:
                break
        return out

    async def _read_from_store(self, key: str, take: int) -> bytes:
        return await retry_async(
            lambda: self.store.read_range(key, 0, take),
            self._retry,
            what=f"read {key} bytes 0-{take - 1}",
        )

    async def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._remote is not None:
            await self._remote.start()

    async def stop(self) -> None:
        if self._remote is not None:
            await self._remote.stop()

    def chunks(self, cancel: threading.Event) -> Iterator[tuple[int, bytes | memoryview]]:
        remote = self._remote.chunks(cancel) if self._remote is not None else iter(())
        buf = bytearray(LOCAL_CHUNK)
        view = memoryview(buf)
        for ordinal, (part, cached) in enumerate(zip(self.backup.parts, self.cached, strict=True)):
            if cached:
                with (self.directory / part.name).open("rb", buffering=0) as f:
                    while True:
                        if cancel.is_set():
                            raise SourceCancelled
                        n = f.readinto(buf)
                        if not n:
                            break
                        self.reused_bytes += n
                        yield ordinal, view[:n]
                continue
            writer = PartWriter(self.directory, part, 1)
            try:
                got = 0
                while got < part.size:
                    item = next(remote, None)
                    if item is None:
                        raise BackupIncomplete(
                            f"part {part.name}: the store delivered {got} of {part.size} bytes"
                        )
                    data = item[1]
                    writer.write(data, got)
                    got += len(data)
                    self.fetched_bytes += len(data)
                    yield ordinal, data
                writer.finish(self.directory)
            finally:
                writer.abort()
