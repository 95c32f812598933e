"""The small object-store interface that the backups layer reads through.

Why this module exists: the backups layer must list, size and read objects in S3 and in Azure
Blob without knowing either SDK (import-linter forbids it), and tests need fakes. Both
adapters (`adapters/s3.py`, `adapters/azure.py`) implement `ObjectStore`; the layer above holds
only this protocol. It lives in `adapters` rather than in `backups` because the adapters must
build `ObjectInfo` values and may not import anything above them.

Every method raises only classes from `pgrecovery.errors`: `StoreUnavailable` (retry),
`StoreAccessDenied`, `BackupNotFound` (bucket/container/object missing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One object as a listing or a HEAD request sees it."""

    key: str
    """Full key (or blob name) inside the bucket/container, including any prefix."""
    size: int
    """Size in bytes."""
    etag: str | None = None
    """Entity tag without quotes, if the store reports one; used to recognise a finished part."""


@runtime_checkable
class ObjectStore(Protocol):
    """Read-only access to one bucket (S3) or container (Azure Blob)."""

    @property
    def description(self) -> str:
        """Where this store points, for messages (`s3://bucket`, `azure://account/container`)."""
        ...

    async def list(self, prefix: str, *, limit: int | None = None) -> list[ObjectInfo]:
        """Objects whose key starts with `prefix`, in key order; at most `limit` if given."""
        ...

    async def head(self, key: str) -> ObjectInfo:
        """Size and ETag of one object; `BackupNotFound` if it does not exist."""
        ...

    async def read_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes `[start, end)` of an object; exactly `end - start` bytes or an error."""
        ...

    async def close(self) -> None:
        """Release connections; the store is not used afterwards."""
        ...


@runtime_checkable
class WritableObjectStore(ObjectStore, Protocol):
    """A store that can also copy (server-side) and delete objects: the Dingo recovery clones
    a deleted instance's WAL-E archive into the new instance's prefix. Only S3 implements it
    (Dingo archives are in S3)."""

    async def copy(self, source_key: str, dest_key: str, *, size: int | None = None) -> ObjectInfo:
        """Server-side copy inside the bucket; the copy's size and ETag as a HEAD sees them."""
        ...

    async def delete(self, keys: Sequence[str]) -> int:
        """Delete `keys` (absent keys count as deleted); returns how many."""
        ...
