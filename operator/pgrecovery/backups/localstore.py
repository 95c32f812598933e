"""A directory of backup files seen as an `ObjectStore`.

Why this module exists: after `pgrecovery backups fetch` (or a manual `aws s3 cp`), the parts
sit in a directory; listing and selecting a backup there must follow exactly the rules used
for the buckets. It is also the in-memory-free fake used by unit tests. The download's own
bookkeeping files (`*.partial`, `*.done.json`) are not listed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from pgrecovery.adapters.objectstore import ObjectInfo
from pgrecovery.errors import BackupNotFound, ConfigurationError, StoreUnavailable

_HIDDEN_SUFFIXES = (".partial", ".done.json")


class LocalDirStore:
    """Files directly inside `directory` (no recursion); keys are file names."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def description(self) -> str:
        return f"directory {self.directory}"

    def _list(self, prefix: str, limit: int | None) -> list[ObjectInfo]:
        if not self.directory.is_dir():
            raise ConfigurationError(f"{self.directory} is not a directory")
        out: list[ObjectInfo] = []
        for path in sorted(self.directory.iterdir()):
            name = path.name
            if not name.startswith(prefix) or name.endswith(_HIDDEN_SUFFIXES):
                continue
            if path.is_file():
                out.append(ObjectInfo(key=name, size=path.stat().st_size))
                if limit is not None and len(out) >= limit:
                    break
        return out

    async def list(self, prefix: str, *, limit: int | None = None) -> list[ObjectInfo]:
        return await asyncio.to_thread(self._list, prefix, limit)

    def _path(self, key: str) -> Path:
        if "/" in key or key in ("", ".", ".."):
            raise BackupNotFound(f"{key!r} is not a file name in {self.directory}")
        return self.directory / key

    async def head(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            size = (await asyncio.to_thread(path.stat)).st_size
        except FileNotFoundError as exc:
            raise BackupNotFound(f"{path} does not exist") from exc
        return ObjectInfo(key=key, size=size)

    async def read_range(self, key: str, start: int, end: int) -> bytes:
        path = self._path(key)

        def run() -> bytes:
            with path.open("rb") as f:
                f.seek(start)
                return f.read(end - start)

        try:
            data = await asyncio.to_thread(run)
        except FileNotFoundError as exc:
            raise BackupNotFound(f"{path} does not exist") from exc
        if len(data) != end - start:
            raise StoreUnavailable(f"{path}: read {len(data)} bytes, expected {end - start}")
        return data

    async def close(self) -> None:
        return None
