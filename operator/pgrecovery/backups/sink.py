"""Write a decrypted dump stream to a file (or any binary file object) with its checksum.

Why this module exists: the dump is staged on the primary and checked there against a
checksum computed while it streamed; locally (CLI, tests, benchmark) the same function writes
it to disk. The file appears under its final name only when the stream ended without error,
so a half-written dump is never mistaken for a good one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO


@dataclass(frozen=True)
class WrittenFile:
    path: Path | None
    size: int
    sha256: str | None
    """Hex digest of the whole output, or None when not asked for."""


def _write(f: BinaryIO, data: bytes, hasher: hashlib._Hash | None) -> None:
    # One thread hop per piece does both: hashlib and write() release the GIL for large data.
    if hasher is not None:
        hasher.update(data)
    f.write(data)


async def write_stream_to_fileobj(
    stream: AsyncIterator[bytes], f: BinaryIO, *, sha256: bool = True
) -> WrittenFile:
    """Copy `stream` to an open binary file (e.g. stdout); return size and checksum."""
    hasher = hashlib.sha256() if sha256 else None
    size = 0
    async for piece in stream:
        await asyncio.to_thread(_write, f, piece, hasher)
        size += len(piece)
    await asyncio.to_thread(f.flush)
    return WrittenFile(None, size, hasher.hexdigest() if hasher else None)


async def write_stream_to_file(
    stream: AsyncIterator[bytes],
    path: Path,
    *,
    sha256: bool = True,
    fsync: bool = False,
) -> WrittenFile:
    """Write `stream` to `path` via `<path>.partial` and rename; return size and sha256.

    `fsync` is off by default: the dump can always be rebuilt from the backup, and a forced
    flush of many GB costs more than it protects. On any error the partial file is removed.
    """
    partial = path.with_name(path.name + ".partial")
    f = await asyncio.to_thread(partial.open, "wb")
    try:
        written = await write_stream_to_fileobj(stream, f, sha256=sha256)
        if fsync:
            await asyncio.to_thread(os.fsync, f.fileno())
    except BaseException:
        f.close()
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        raise
    f.close()
    await asyncio.to_thread(partial.replace, path)
    return WrittenFile(path, written.size, written.sha256)
