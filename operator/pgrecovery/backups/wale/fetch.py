"""Download WAL-E objects to the work directory and verify them before anything is changed.

Why this module exists: every check that can fail harmlessly must run in Fetching — a corrupt
lzop block, a missing WAL segment, a foreign system identifier. So the base backup's tar
partitions and every WAL segment the recovery needs are downloaded (resumable per object) and
decoded once here with all lzop checksums verified; the later phases decode the verified files
again while streaming them to the VM (LZO decodes at hundreds of MB/s, so a second pass is
cheaper than keeping the decompressed copy on the operator's disk).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pgrecovery.adapters.objectstore import ObjectInfo, ObjectStore
from pgrecovery.backups.wale import lzop
from pgrecovery.backups.wale.archive import Archive, BaseBackup
from pgrecovery.backups.wale.history import sysid_from_tar
from pgrecovery.backups.wale.layout import Segment
from pgrecovery.backups.wale.planning import TimelineEntry, required_segments, segment_for
from pgrecovery.backups.wale.walscan import SegmentInfo, WalScanner
from pgrecovery.errors import BackupCorrupt, BackupIncomplete

RANGE_SIZE = 8 * 1024 * 1024
# Window end: how many segments back from the newest one to look for a transaction. Idle
# servers with archive_timeout write segments holding no commit; 64 segments (1 GiB of WAL)
# covers hours of idle switching.
WINDOW_SCAN_SEGMENTS = 64

BytesProgress = Callable[[int], None]


class SystemIdMismatch(BackupCorrupt):
    """Objects of two different database clusters are mixed in one archive prefix."""

    reason = "SystemIdMismatch"


def local_name(key: str) -> str:
    return key.replace("/", "__")


async def download(
    store: ObjectStore, obj: ObjectInfo, dest_dir: Path, progress: BytesProgress | None = None
) -> Path:
    """`obj` into `dest_dir` (resumable: a complete file of the right size is kept)."""
    dest = dest_dir / local_name(obj.key)
    if dest.exists() and dest.stat().st_size == obj.size:
        if progress:
            progress(obj.size)
        return dest
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    if offset > obj.size:
        offset = 0
    with part.open("r+b" if offset else "wb") as fh:
        fh.seek(offset)
        fh.truncate()
        while offset < obj.size:
            end = min(obj.size, offset + RANGE_SIZE)
            data = await store.read_range(obj.key, offset, end)
            await asyncio.to_thread(fh.write, data)
            offset = end
            if progress:
                progress(len(data))
    if part.stat().st_size != obj.size:
        raise BackupIncomplete(f"{obj.key}: downloaded {part.stat().st_size} of {obj.size} bytes")
    os.replace(part, dest)
    return dest


def decode_segment(path: Path, what: str) -> bytes:
    return b"".join(lzop.decode_file(path, what))


def _check_sysid(info: SegmentInfo, sysid: int | None, what: str) -> None:
    if sysid is not None and info.sysid != sysid:
        raise SystemIdMismatch(
            f"{what}: WAL segment belongs to database system {info.sysid}, but the archive's "
            f"sysids/sysid and base backup are {sysid}; the prefix mixes two clusters "
            "(e.g. after an unsafe `aws s3 sync`)"
        )


async def window_end(
    store: ObjectStore, archive: Archive, path: list[TimelineEntry], last: Segment,
    work: Path, sysid: int | None,
) -> datetime | None:
    """Newest transaction time in the last segments of the archive."""
    scanner = WalScanner()
    for segno in range(last.segno, max(-1, last.segno - WINDOW_SCAN_SEGMENTS), -1):
        seg = segment_for(path, segno)
        obj = archive.segments.get(seg.name)
        if obj is None:
            break
        local = await download(store, obj, work)
        data = await asyncio.to_thread(decode_segment, local, obj.key)
        info = scanner.scan(seg, data, obj.key)
        _check_sysid(info, sysid, obj.key)
        if info.last_time is not None:
            return info.last_time
    return None


@dataclass(frozen=True)
class WalPlan:
    segments: list[Segment]
    reached_target: bool
    """A transaction later than the target was found (False when replaying to the end)."""


async def fetch_wal(
    store: ObjectStore,
    archive: Archive,
    path: list[TimelineEntry],
    backup: BaseBackup,
    *,
    target: datetime | None,
    last: Segment,
    stop_segno: int,
    work: Path,
    sysid: int | None,
    progress: BytesProgress | None = None,
) -> WalPlan:
    """Download, verify and scan WAL from the backup's first segment on. With a target, stop
    at the first segment holding a transaction at or after it (what replay needs); without,
    go to `last`. Every segment up to `stop_segno` (the backup's consistency point) is needed
    in any case. A missing segment fails naming it."""
    first = backup.name.first_segno
    scanner = WalScanner()
    fetched: list[Segment] = []
    for segno in range(first, last.segno + 1):
        why = (f"needed to replay base backup {backup.name.name} "
               + (f"to {target.isoformat()}" if target else "to the end of the archive"))
        (seg,) = required_segments(archive, path, segno, segno, why)
        obj = archive.segments[seg.name]
        local = await download(store, obj, work, progress)
        data = await asyncio.to_thread(decode_segment, local, obj.key)
        info = scanner.scan(seg, data, obj.key)
        _check_sysid(info, sysid, obj.key)
        fetched.append(seg)
        # recovery_target_inclusive = on: a transaction AT the target also ends replay.
        if target is not None and segno >= stop_segno and any(t >= target for t in
                                                               info.xact_times):
            return WalPlan(fetched, reached_target=True)
    if target is not None:
        raise BackupIncomplete(
            f"no transaction later than {target.isoformat()} in the WAL up to {last.name}; "
            "PostgreSQL could not confirm the target was reached"
        )
    return WalPlan(fetched, reached_target=False)


def verify_base_backup(parts: list[tuple[Path, str]]) -> tuple[int | None, int]:
    """Decode every partition (checksums) and read pg_control's system identifier.
    Returns (sysid or None, decompressed bytes)."""
    sysid: int | None = None
    total = 0
    for path, what in parts:
        reader = lzop.DecodedReader(lzop.decode_file(path, what))
        found = sysid_from_tar(reader, what)
        reader.read()  # tar stops at its end-of-archive blocks; check the rest too
        total += reader.bytes_out
        if found is not None:
            sysid = found
    return sysid, total
