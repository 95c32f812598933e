"""Broken WAL-E archives for negative tests, and the point-in-time data shape.

Why this exists: the physical-recovery code must refuse or report damaged archives (a corrupt
lzop block, a segment missing from the WAL chain, a `sysids/sysid` from another database) and
must stop replay at a target time. These tools damage a real archive the way such accidents
look, and `commit_rows_around_time` writes the PITR test's story: rows A committed, then a
target time T, then rows B committed — both archived, so a restore to T has A and not B.

Corruption is checked by lzop itself: its files carry an Adler-32 checksum of every block's
uncompressed data (flag F_ADLER32_D, on by default), so one changed byte in a block's data
makes `lzop -d`/`lzop -t` fail with a checksum (or data violation) error.
"""

from __future__ import annotations

import datetime as dt
import struct
import time
import uuid
from dataclasses import dataclass

from .archive import (
    ArchiveTarget,
    PostgresHost,
    WaleWorldError,
    archive_window,
    switch_wal_and_wait,
)
from .layout import segment_number

LZOP_MAGIC = b"\x89LZO\x00\r\n\x1a\n"
F_ADLER32_D, F_ADLER32_C = 0x1, 0x2
F_H_EXTRA_FIELD, F_CRC32_D, F_CRC32_C, F_H_FILTER = 0x40, 0x100, 0x200, 0x800


@dataclass(frozen=True)
class LzopBlock:
    data_offset: int
    """Where the block's (compressed or stored) bytes start in the file."""
    compressed_size: int
    uncompressed_size: int


def lzop_blocks(data: bytes) -> list[LzopBlock]:
    """The blocks of an lzop file (format of lzop 1.0x: header, then blocks until a 0)."""
    if not data.startswith(LZOP_MAGIC):
        raise WaleWorldError("not an lzop file")
    pos = len(LZOP_MAGIC)

    def take(fmt: str) -> int:
        nonlocal pos
        (value,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return int(value)

    version = take(">H")
    take(">H")  # library version
    if version >= 0x0940:
        take(">H")  # version needed to extract
    take(">B")  # method
    if version >= 0x0940:
        take(">B")  # level
    flags = take(">I")
    if flags & F_H_FILTER:
        take(">I")
    take(">I")  # mode
    take(">I")  # mtime (low)
    if version >= 0x0940:
        take(">I")  # mtime (high)
    name_length = take(">B")  # (not `pos += take(…)`: that adds to the old `pos`)
    pos += name_length
    take(">I")  # header checksum
    if flags & F_H_EXTRA_FIELD:
        extra_length = take(">I")
        pos += extra_length
        take(">I")
    blocks: list[LzopBlock] = []
    while True:
        uncompressed = take(">I")
        if uncompressed == 0:
            return blocks
        compressed = take(">I")
        pos += 4 * bool(flags & F_ADLER32_D) + 4 * bool(flags & F_CRC32_D)
        if compressed < uncompressed:
            pos += 4 * bool(flags & F_ADLER32_C) + 4 * bool(flags & F_CRC32_C)
        blocks.append(LzopBlock(pos, compressed, uncompressed))
        pos += compressed


def corrupt_lzop_object(target: ArchiveTarget, key: str, *, block: int = 0) -> int:
    """Change one byte in the middle of block `block` of the lzop object `key` (in place, same
    size, so a listing looks normal); returns the changed byte's offset."""
    client = target.client()
    data = bytearray(client.get_object(Bucket=target.bucket, Key=key)["Body"].read())
    found = lzop_blocks(bytes(data))
    if not -len(found) <= block < len(found):
        raise WaleWorldError(f"{key} has {len(found)} blocks, no block {block}")
    chosen = found[block]
    offset = chosen.data_offset + chosen.compressed_size // 2
    data[offset] ^= 0x5A
    client.put_object(Bucket=target.bucket, Key=key, Body=bytes(data))
    return offset


def corrupt_partition(target: ArchiveTarget, backup_name: str, index: int = 0) -> str:
    """Corrupt tar partition `index` of base backup `backup_name`; returns its key."""
    key = target.layout.partition(backup_name, index)
    corrupt_lzop_object(target, key)
    return key


def corrupt_wal_segment(target: ArchiveTarget, segment: str) -> str:
    """Corrupt the archived WAL segment `segment`; returns its key."""
    key = target.layout.wal_object(segment)
    corrupt_lzop_object(target, key)
    return key


def delete_wal_segment(target: ArchiveTarget, segment: str) -> str:
    key = target.layout.wal_object(segment)
    if not target.exists(key):
        raise WaleWorldError(f"{segment} is not in {target.url}")
    target.client().delete_object(Bucket=target.bucket, Key=key)
    return key


def delete_middle_segment(target: ArchiveTarget, after: str) -> str:
    """Delete one archived segment strictly between `after` (e.g. a base backup's stop
    segment) and the newest archived segment of the same timeline; returns its name. Needs
    at least two more segments after `after` (switch WAL first)."""
    timeline = after[:8]
    later = [
        s
        for s in archive_window(target).segments
        if s[:8] == timeline and segment_number(s) > segment_number(after)
    ]
    if len(later) < 2:
        raise WaleWorldError(f"need two archived segments after {after}, have {later}")
    victim = later[(len(later) - 1) // 2]  # never the newest one
    delete_wal_segment(target, victim)
    return victim


def write_sysid(target: ArchiveTarget, sysid: str) -> None:
    """Overwrite `sysids/sysid` (Dingo's format: decimal identifier and a newline)."""
    if not sysid.isdigit():
        raise ValueError(f"a system identifier is decimal digits, not {sysid!r}")
    target.client().put_object(
        Bucket=target.bucket, Key=target.layout.sysid, Body=f"{sysid}\n".encode()
    )


def other_sysid(sysid: str) -> str:
    """A plausible, different system identifier (same magnitude)."""
    return str(int(sysid) ^ 0xFFFF)


@dataclass(frozen=True)
class PitrPoint:
    """What `commit_rows_around_time` wrote."""

    table: str
    """`public.<table>` in database postgres: column `batch` is 'A' or 'B'."""
    target_time: dt.datetime
    """T, timezone-aware (the server's clock): after every A commit, before every B commit."""
    rows_a: int
    rows_b: int
    last_segment: str
    """The segment closed (and archived) after B was committed."""

    @property
    def recovery_target_time(self) -> str:
        """T as PostgreSQL's `recovery_target_time` value."""
        return self.target_time.isoformat(sep=" ")


def commit_rows_around_time(
    pg: PostgresHost,
    target: ArchiveTarget,
    *,
    rows_a: int = 100,
    rows_b: int = 50,
    gap_s: float = 1.0,
    table: str | None = None,
    timeout: float = 90.0,
) -> PitrPoint:
    """Rows A committed → (T) → rows B committed, WAL switched and archived; returns T.

    `gap_s` separates the commits from T on the server's clock, so a restore to T stops after
    A and before B whatever the timestamp rounding.
    """
    name = table or f"pitr_{uuid.uuid4().hex[:10]}"
    if not name.isidentifier() or not name.islower():
        raise ValueError(f"table name {name!r} must be a lowercase identifier")
    # The name is checked above; the counts are ints: nothing here comes from outside.
    create = f"CREATE TABLE {name} (id int PRIMARY KEY, batch text NOT NULL);"
    batch_a = f"INSERT INTO {name} SELECT g, 'A' FROM generate_series(1, {int(rows_a)}) g;"  # noqa: S608
    last = int(rows_a) + int(rows_b)
    batch_b = f"INSERT INTO {name} SELECT g, 'B' FROM generate_series({int(rows_a) + 1}, {last}) g;"  # noqa: S608
    pg.psql(create + batch_a)
    time.sleep(gap_s)
    now_utc = "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US')"
    moment = dt.datetime.fromisoformat(pg.psql(now_utc)).replace(tzinfo=dt.UTC)
    time.sleep(gap_s)
    pg.psql(batch_b)
    segment = switch_wal_and_wait(pg, target, timeout=timeout)
    return PitrPoint(name, moment, rows_a, rows_b, segment)
