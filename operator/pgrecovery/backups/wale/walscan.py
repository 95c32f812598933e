"""Read what recovery planning needs from WAL segments: system identifier and commit times.

Why this module exists: the recovery window's END is the time of the last transaction the
archive can replay. We read it from the WAL itself — the timestamps of commit and abort records
— rather than from an object's LastModified, because PostgreSQL decides with exactly these
records: `recovery_target_time` stops before the first commit/abort later than the target, and
PostgreSQL 13+ ends with FATAL "recovery ended before configured recovery target was reached"
when no such record exists in the available WAL. That FATAL would come after the data directory
was replaced; LastModified (upload time, always later than the last commit) would accept such a
target. So a target is inside the window only if a commit/abort at or after it is in the archive.

The same walk gives each segment's system identifier (long page header), compared with the
archive's `sysids/sysid` and the base backup's pg_control.

Format (PostgreSQL 15, src/include/access/xlog_internal.h, xlogrecord.h, xact.h):
page header 24 bytes (40 on a segment's first page: + sysid, seg size, block size); records
8-byte aligned, may span pages and segments (continuation pages carry `xlp_rem_len`);
XLogRecord = tot_len u32, xid u32, prev u64, info u8, rmid u8, 2 pad, crc u32; then block
headers, the main-data header (255 short / 254 long) last, main data at the record's end.
Transaction records: rmid 1; info & 0x70: 0x00 commit, 0x20 abort, 0x30 commit prepared,
0x40 abort prepared; main data starts with `xact_time`, int64 µs since 2000-01-01 UTC.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from pgrecovery.backups.wale.layout import WAL_SEGMENT_SIZE, Segment
from pgrecovery.errors import BackupCorrupt

XLOG_PAGE_MAGIC_PG15 = 0xD110
PAGE_SIZE = 8192
SHORT_PHD = 24
LONG_PHD = 40
RECORD_HEADER = 24
XLP_FIRST_IS_CONTRECORD = 0x0001
XLP_LONG_HEADER = 0x0002
RM_XLOG_ID = 0
RM_XACT_ID = 1
XLOG_SWITCH = 0x40
XACT_OPMASK = 0x70
_XACT_TIMED = {0x00, 0x20, 0x30, 0x40}
PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


def pg_time(us: int) -> datetime:
    return PG_EPOCH + timedelta(microseconds=us)


def _align(n: int) -> int:
    return (n + 7) & ~7


@dataclass
class SegmentInfo:
    segment: Segment
    sysid: int
    xact_times: list[datetime] = field(default_factory=list)

    @property
    def last_time(self) -> datetime | None:
        return max(self.xact_times) if self.xact_times else None


@dataclass
class _Carry:
    """A record that continues into the next segment."""

    data: bytearray
    total: int


class WalScanner:
    """Feed consecutive segments (in WAL order) to collect transaction times per segment."""

    def __init__(self, magic: int | None = XLOG_PAGE_MAGIC_PG15) -> None:
        self.magic = magic
        self._carry: _Carry | None = None
        self._expect: int | None = None

    def scan(self, segment: Segment, data: bytes, what: str) -> SegmentInfo:  # noqa: PLR0911 - one exit per way a segment's written WAL ends
        if len(data) != WAL_SEGMENT_SIZE:
            raise BackupCorrupt(f"{what}: WAL segment has {len(data)} bytes, expected "
                                f"{WAL_SEGMENT_SIZE} (only 16 MiB segments are supported)")
        magic, info, _tli, pageaddr, rem_len = struct.unpack_from("<HHIQI", data, 0)
        if self.magic is not None and magic != self.magic:
            raise BackupCorrupt(f"{what}: WAL page magic {magic:#06x} is not PostgreSQL 15's "
                                f"{self.magic:#06x}")
        if not info & XLP_LONG_HEADER:
            raise BackupCorrupt(f"{what}: first WAL page lacks the long header")
        sysid, seg_size, blcksz = struct.unpack_from("<QII", data, 24)
        if seg_size != WAL_SEGMENT_SIZE or blcksz != PAGE_SIZE:
            raise BackupCorrupt(f"{what}: WAL segment size {seg_size} / block size {blcksz} "
                                "are not the supported 16 MiB / 8 KiB")
        if pageaddr != segment.start_lsn:
            raise BackupCorrupt(f"{what}: WAL header says it starts at {pageaddr:#x}, its name "
                                f"says {segment.start_lsn:#x} (renamed or recycled file)")
        result = SegmentInfo(segment, sysid)
        carry = self._carry if self._expect == segment.segno else None
        self._carry = None
        self._expect = segment.segno + 1
        pos = LONG_PHD
        if info & XLP_FIRST_IS_CONTRECORD:
            if carry is not None:
                record, pos, done = self._read_on(data, segment, pos, carry.data, carry.total)
                if not done:
                    return result
                self._record(record, result)
            else:
                pos = self._skip(data, pos, rem_len)
                if pos < 0:
                    return result
        pos = _align(pos)
        while pos < WAL_SEGMENT_SIZE:
            if pos % PAGE_SIZE == 0:
                if not self._page_ok(data, segment, pos):
                    return result
                pos += SHORT_PHD
            if PAGE_SIZE - pos % PAGE_SIZE < 4:  # pragma: no cover - alignment forbids it
                pos = _align(pos + 1)
                continue
            (tot_len,) = struct.unpack_from("<I", data, pos)
            if tot_len < RECORD_HEADER:
                return result  # zeroed remainder: the end of written WAL
            record, pos, done = self._read_on(data, segment, pos, bytearray(), tot_len)
            if not done:
                self._carry = _Carry(record, tot_len)
                return result
            if self._record(record, result):
                return result  # XLOG_SWITCH: the rest of the segment is padding
            pos = _align(pos)
        return result

    def _page_ok(self, data: bytes, segment: Segment, pos: int) -> bool:
        magic, _info, _tli, pageaddr, _rem = struct.unpack_from("<HHIQI", data, pos)
        return bool((self.magic is None or magic == self.magic) and pageaddr == (
            segment.start_lsn + pos
        ))

    def _skip(self, data: bytes, pos: int, n: int) -> int:
        """Skip `n` continuation bytes (of a record begun in a segment we do not have)."""
        while n > 0:
            if pos >= WAL_SEGMENT_SIZE:
                return -1
            if pos % PAGE_SIZE == 0:
                pos += SHORT_PHD
            take = min(n, PAGE_SIZE - pos % PAGE_SIZE)
            pos += take
            n -= take
        return pos

    def _read_on(
        self, data: bytes, segment: Segment, pos: int, buf: bytearray, total: int
    ) -> tuple[bytearray, int, bool]:
        while len(buf) < total:
            if pos >= WAL_SEGMENT_SIZE:
                return buf, pos, False
            if pos % PAGE_SIZE == 0:
                if not self._page_ok(data, segment, pos):
                    return buf, WAL_SEGMENT_SIZE, False
                pos += SHORT_PHD if pos else LONG_PHD
            take = min(total - len(buf), PAGE_SIZE - pos % PAGE_SIZE)
            buf += data[pos:pos + take]
            pos += take
        return buf, pos, True

    @staticmethod
    def _record(record: bytearray | bytes, result: SegmentInfo) -> bool:
        tot_len, _xid, _prev, info, rmid = (
            int(v) for v in struct.unpack_from("<IIQBB", record, 0)
        )
        if rmid == RM_XLOG_ID and info & 0xF0 == XLOG_SWITCH:
            return True
        if rmid != RM_XACT_ID or info & XACT_OPMASK not in _XACT_TIMED:
            return False
        main_len = _main_data_length(record)
        if main_len is None or main_len < 8:
            return False
        (us,) = struct.unpack_from("<q", record, tot_len - main_len)
        result.xact_times.append(pg_time(us))
        return False


def _main_data_length(record: bytes | bytearray) -> int | None:
    pos = RECORD_HEADER
    while pos < len(record):
        block_id = record[pos]
        if block_id == 255:
            return record[pos + 1]
        if block_id == 254:
            value: int = struct.unpack_from("<I", record, pos + 1)[0]
            return value
        if block_id == 253:
            pos += 3
        elif block_id == 252:
            pos += 5
        else:
            return None  # block references: transaction records carry none
    return None


def scan_segments(items: Iterable[tuple[Segment, bytes, str]]) -> list[SegmentInfo]:
    """Scan consecutive segments; records spanning two segments are joined."""
    scanner = WalScanner()
    return [scanner.scan(seg, data, what) for seg, data, what in items]
