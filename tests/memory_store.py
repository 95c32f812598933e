"""An in-memory object store, and a base for stores that wrap another, for unit tests.

Why this module exists: unit tests of listing, archive reading and the pipeline need a store
with S3's semantics (keys in order, prefixes, exact ranges, a missing key is BackupNotFound)
without a server; three test modules each had their own copy. The real adapters are tested
against real servers (moto, SeaweedFS, Azurite) in tests/integration/.
"""

from __future__ import annotations

from collections.abc import Sequence

from pgrecovery.adapters.objectstore import ObjectInfo, ObjectStore
from pgrecovery.errors import BackupNotFound


class MemoryStore:
    """`ObjectStore` and `WritableObjectStore` over a dict of key → bytes."""

    def __init__(self, objects: dict[str, bytes] | None = None) -> None:
        self.objects: dict[str, bytes] = dict(objects or {})
        self.closed = False

    @property
    def description(self) -> str:
        return "memory://bucket"

    async def list(self, prefix: str, *, limit: int | None = None) -> list[ObjectInfo]:
        keys = sorted(k for k in self.objects if k.startswith(prefix))[:limit]
        return [ObjectInfo(k, len(self.objects[k])) for k in keys]

    async def head(self, key: str) -> ObjectInfo:
        if key not in self.objects:
            raise BackupNotFound(f"{self.description}/{key} does not exist")
        return ObjectInfo(key, len(self.objects[key]))

    async def read_range(self, key: str, start: int, end: int) -> bytes:
        data = self.objects.get(key)
        if data is None:
            raise BackupNotFound(f"{self.description}/{key} does not exist")
        if not 0 <= start <= end <= len(data):
            raise ValueError(f"range [{start}, {end}) outside {key} ({len(data)} bytes)")
        return data[start:end]

    async def copy(self, source_key: str, dest_key: str, *, size: int | None = None) -> ObjectInfo:
        info = await self.head(source_key)
        self.objects[dest_key] = self.objects[source_key]
        return ObjectInfo(dest_key, info.size)

    async def delete(self, keys: Sequence[str]) -> int:
        for key in keys:
            self.objects.pop(key, None)
        return len(keys)

    async def close(self) -> None:
        self.closed = True


class WrappedStore:
    """Passes everything to `inner`; subclasses change what they test (faults, buffers)."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner

    @property
    def description(self) -> str:
        return self.inner.description

    async def list(self, prefix: str, *, limit: int | None = None) -> list[ObjectInfo]:
        return await self.inner.list(prefix, limit=limit)

    async def head(self, key: str) -> ObjectInfo:
        return await self.inner.head(key)

    async def read_range(self, key: str, start: int, end: int) -> bytes:
        return await self.inner.read_range(key, start, end)

    async def close(self) -> None:
        await self.inner.close()
