"""Where the encrypted bytes come from: downloaded part files, or the object store directly.

Why this module exists: the decrypt pipeline reads one ciphertext, the parts concatenated in
natural order, and must not care whether the parts sit in a work directory (after a resumable
download) or are streamed from S3/Azure while decrypting (so a later phase can overlap
download, decryption and upload). Both sources hand out chunks on the pipeline's decrypt
thread and keep memory bounded.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast, runtime_checkable

from pgrecovery.adapters.objectstore import ObjectStore
from pgrecovery.adapters.retry import RetryPolicy, retry_async
from pgrecovery.backups.listing import Backup
from pgrecovery.errors import BackupIncomplete, ConfigurationError

# 1 MiB reads from local files: the decryptor and inflater work per call at memory speed, so
# larger reads only add memory; smaller ones add per-call Python overhead.
LOCAL_CHUNK = 1 << 20
# 2 MiB ranged GETs, 4 in flight + 2 queued: six 2 MiB buffers, 12 MiB for a streaming source
# whatever the backup size. Measured 2026-12-03 (`pgrecovery backups decrypt`, SeaweedFS, 512 MB
# dump): 4 MiB x 6 peaked at 110 MiB RSS, 2 MiB x 6 at 92 MiB, at the same speed; with ~50 ms
# S3 latency four 2 MiB requests in flight still carry ~100 MB/s of ciphertext (~360 MB/s of
# dump). A store may ask for another size with a `range_size` attribute.
STORE_CHUNK = 2 << 20
STORE_READ_AHEAD = 4
STORE_QUEUED = 2
# How often blocked worker threads look at the cancel flag, in seconds.
POLL = 0.1


class SourceCancelled(Exception):
    """The consumer went away; worker threads unwind quietly."""


@dataclass(frozen=True)
class SourcePart:
    name: str
    size: int


class CiphertextSource(abc.ABC):
    """The encrypted stream of one backup, parts in natural order."""

    backup_id: str
    parts: tuple[SourcePart, ...]

    @property
    def total_size(self) -> int:
        return sum(p.size for p in self.parts)

    @abc.abstractmethod
    async def read_head(self, n: int) -> bytes:
        """The first `n` bytes of the stream (for the key check before anything else)."""

    async def start(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Begin producing (a streaming source starts its fetch task here)."""

    async def stop(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Stop producing and release resources; safe to call twice."""

    @abc.abstractmethod
    def chunks(self, cancel: threading.Event) -> Iterator[tuple[int, bytes | memoryview]]:
        """Blocking: yield `(part ordinal, data)` in order. Runs on a worker thread.

        A yielded memoryview is valid only until the next item is requested.
        """


class LocalPartsSource(CiphertextSource):
    """Part files on local disk, read in the given (natural) order."""

    def __init__(
        self,
        paths: Sequence[Path],
        *,
        backup_id: str = "",
        expected_sizes: Sequence[int] | None = None,
        chunk_size: int = LOCAL_CHUNK,
    ) -> None:
        if not paths:
            raise ConfigurationError("no part files given")
        self.paths = tuple(paths)
        self.backup_id = backup_id or paths[0].name
        self._chunk = chunk_size
        parts = []
        for i, path in enumerate(self.paths):
            try:
                size = path.stat().st_size
            except FileNotFoundError as exc:
                raise BackupIncomplete(f"part file {path} is missing") from exc
            if expected_sizes is not None and size != expected_sizes[i]:
                raise BackupIncomplete(
                    f"part file {path} has {size} bytes, the store has {expected_sizes[i]}: "
                    "the download is incomplete (fetch it again)"
                )
            parts.append(SourcePart(path.name, size))
        self.parts = tuple(parts)

    @classmethod
    def for_backup(cls, backup: Backup, directory: Path, **kwargs: int) -> LocalPartsSource:
        """The downloaded parts of `backup` in `directory` (named as in the store)."""
        return cls(
            [directory / p.name for p in backup.parts],
            backup_id=backup.backup_id,
            expected_sizes=[p.size for p in backup.parts],
            **kwargs,
        )

    async def read_head(self, n: int) -> bytes:
        return await asyncio.to_thread(self._read_head, n)

    def _read_head(self, n: int) -> bytes:
        out = b""
        for path in self.paths:
            with path.open("rb") as f:
                out += f.read(n - len(out))
            if len(out) >= n:
                break
        return out

    def chunks(self, cancel: threading.Event) -> Iterator[tuple[int, bytes | memoryview]]:
        buf = bytearray(self._chunk)
        view = memoryview(buf)
        for ordinal, path in enumerate(self.paths):
            with path.open("rb", buffering=0) as f:
                while True:
                    if cancel.is_set():
                        raise SourceCancelled
                    n = f.readinto(buf)
                    if not n:
                        break
                    yield ordinal, view[:n]


_END = object()


@runtime_checkable
class RangeIntoStore(Protocol):
    """A store that can read a range straight into a caller's buffer (S3, Azure adapters).

    Stores without it (local directories, test fakes) are read with `read_range` and copied.
    """

    async def read_range_into(self, key: str, start: int, buffer: memoryview) -> None:
        """Fill `buffer` with bytes `[start, start + len(buffer))` of `key`, exactly, or raise."""
        ...


def range_size_for(store: ObjectStore) -> int:
    """The range size a streaming source uses for `store`: its own `range_size`, if it has
    one, else `STORE_CHUNK`."""
    size = getattr(store, "range_size", None)
    return size if isinstance(size, int) and size > 0 else STORE_CHUNK


class StorePartsSource(CiphertextSource):
    """Parts read straight from the object store with ranged GETs and read-ahead.

    A task on the event loop keeps up to `read_ahead` range requests in flight, each reading
    into one of `read_ahead + queued` buffers allocated once, and hands the filled buffers, in
    order, to the decrypt thread, which gives each back when it asks for the next. So the
    source holds exactly `(read_ahead + queued) x chunk_size` bytes whatever the backup size,
    and allocates nothing per request: a fresh `bytes` per range, released by another thread,
    with up to 28 MiB of ranges in flight and queued, took `pgrecovery backups decrypt` to a
    peak RSS of 152 MiB from S3 against 64 MiB from a directory (2026-12-03).
    """

    def __init__(
        self,
        store: ObjectStore,
        backup: Backup,
        *,
        chunk_size: int | None = None,
        read_ahead: int = STORE_READ_AHEAD,
        queued: int = STORE_QUEUED,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.store = store
        self.backup = backup
        self.backup_id = backup.backup_id
        self.parts = tuple(SourcePart(p.name, p.size) for p in backup.parts)
        self._chunk = chunk_size or range_size_for(store)
        self._read_ahead = max(1, read_ahead)
        self._slots = self._read_ahead + max(1, queued)
        self._retry = retry or RetryPolicy()
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._task: asyncio.Task[None] | None = None
        self._release: Callable[[bytearray], object] = lambda _buffer: None

    @property
    def buffer_bytes(self) -> int:
        """The most ciphertext this source holds at once."""
        largest = max((p.size for p in self.backup.parts), default=0)
        return self._slots * min(self._chunk, max(largest, 1))

    async def _read(self, key: str, start: int, end: int) -> bytes:
        return await retry_async(
            lambda: self.store.read_range(key, start, end),
            self._retry,
            what=f"read {key} bytes {start}-{end - 1}",
        )

    async def _read_into(self, key: str, start: int, buffer: memoryview) -> None:
        store = self.store
        if isinstance(store, RangeIntoStore):
            into = store

            async def attempt() -> None:
                await into.read_range_into(key, start, buffer)

        else:

            async def attempt() -> None:
                buffer[:] = await store.read_range(key, start, start + len(buffer))

        await retry_async(
            attempt, self._retry, what=f"read {key} bytes {start}-{start + len(buffer) - 1}"
        )

    async def read_head(self, n: int) -> bytes:
        out = b""
        for part in self.backup.parts:
            take = min(n - len(out), part.size)
            if take > 0:
                out += await self._read(part.key, 0, take)
            if len(out) >= n:
                break
        return out

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._produce(), name=f"fetch {self.backup_id}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
        if task is not None:
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise

    async def _produce(self) -> None:
        loop = asyncio.get_running_loop()
        largest = max((p.size for p in self.backup.parts), default=0)
        size = min(self._chunk, max(largest, 1))
        free = [bytearray(size) for _ in range(self._slots)]
        returned = asyncio.Event()

        def give_back(buffer: bytearray) -> None:
            free.append(buffer)
            returned.set()

        self._release = lambda buffer: loop.call_soon_threadsafe(give_back, buffer)
        inflight: collections.deque[tuple[int, memoryview, bytearray, asyncio.Task[None]]] = (
            collections.deque()
        )
        ranges = (
            (ordinal, part.key, start, min(start + self._chunk, part.size))
            for ordinal, part in enumerate(self.backup.parts)
            for start in range(0, part.size, self._chunk)
        )
        try:
            exhausted = False
            while True:
                while not exhausted and free and len(inflight) < self._read_ahead:
                    item = next(ranges, None)
                    if item is None:
                        exhausted = True
                        break
                    ordinal, key, start, end = item
                    buffer = free.pop()
                    view = memoryview(buffer)[: end - start]
                    task = asyncio.create_task(self._read_into(key, start, view))
                    inflight.append((ordinal, view, buffer, task))
                if not inflight:
                    if exhausted:
                        break
                    # Every buffer is queued or held by the decrypt thread: wait for one.
                    returned.clear()
                    if not free:
                        await returned.wait()
                    continue
                ordinal, view, buffer, task = inflight.popleft()
                await task
                self._queue.put((ordinal, view, buffer))
            self._queue.put(_END)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread
            self._queue.put(exc)
        finally:
            for *_, task in inflight:
                task.cancel()
            for *_, task in inflight:
                with contextlib.suppress(BaseException):  # already reporting the first error
                    await task

    def chunks(self, cancel: threading.Event) -> Iterator[tuple[int, bytes | memoryview]]:
        held: bytearray | None = None
        try:
            while True:
                if held is not None:
                    # The consumer asked for the next piece: it is done with the last buffer.
                    self._release(held)
                    held = None
                try:
                    item = self._queue.get(timeout=POLL)
                except queue.Empty:
                    if cancel.is_set():
                        raise SourceCancelled from None
                    continue
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                ordinal, view, held = cast(tuple[int, memoryview, bytearray], item)
                yield ordinal, view
        finally:
            if held is not None:
                self._release(held)
