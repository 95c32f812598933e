"""WAL scanning (backups/wale/walscan.py) on WAL built page by page in PostgreSQL 15's format.

The real-WAL check (against `pg_waldump` on segments a real PostgreSQL archived) is in
tests/integration/test_wale_reading.py; here the edge cases are placed on purpose: a record
split across pages, a commit split across two segments, a segment read without its
predecessor, a zeroed tail, XLOG_SWITCH padding, recycled and foreign segments.
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta

import pytest

from pgrecovery.backups.wale.layout import WAL_SEGMENT_SIZE, Segment
from pgrecovery.backups.wale.walscan import (
    PG_EPOCH,
    WalScanner,
    scan_segments,
)
from pgrecovery.errors import BackupCorrupt

PAGE = 8192
MAGIC = 0xD110
SYSID = 7310000000000000001


def _align(n: int) -> int:
    return (n + 7) & ~7


def _record(rmid: int, info: int, main: bytes) -> bytes:
    if len(main) < 256:
        body = bytes([255, len(main)]) + main
    else:
        body = bytes([254]) + struct.pack("<I", len(main)) + main
    tot = 24 + len(body)
    return struct.pack("<IIQBBxxI", tot, 1, 0, info, rmid, 0) + body


def _commit(when: datetime, info: int = 0x00) -> bytes:
    us = (when - PG_EPOCH) // timedelta(microseconds=1)
    return _record(1, info, struct.pack("<q", us) + b"\0" * 8)


class WalWriter:
    """Lays records out like XLogInsert: 8-byte aligned, page headers every 8 KiB (long at a
    segment start), continuation flags and `xlp_rem_len` on pages a record continues onto."""

    def __init__(self, first_segno: int, tli: int = 1, sysid: int = SYSID) -> None:
        self.base = first_segno * WAL_SEGMENT_SIZE
        self.tli, self.sysid = tli, sysid
        self.buf = bytearray()

    @property
    def pos(self) -> int:
        return len(self.buf)

    def _header(self, rem: int) -> None:
        at = self.base + self.pos
        info = 0x0001 if rem else 0
        long = at % WAL_SEGMENT_SIZE == 0
        if long:
            info |= 0x0002
        head = struct.pack("<HHIQI", MAGIC, info, self.tli, at, rem) + b"\0" * 4
        if long:
            head += struct.pack("<QII", self.sysid, WAL_SEGMENT_SIZE, PAGE)
        self.buf += head

    def add(self, record: bytes) -> None:
        self.buf += b"\0" * (_align(self.pos) - self.pos)
        i = 0
        while i < len(record):
            if self.pos % PAGE == 0:
                self._header(len(record) - i if i else 0)
            take = min(len(record) - i, PAGE - self.pos % PAGE)
            self.buf += record[i:i + take]
            i += take

    def fill_to(self, offset: int) -> None:
        """One filler record (rmid 0, a no-op info) ending exactly at relative `offset`."""
        start = _align(self.pos)
        data = 0
        p = start
        while p < offset:
            if p % PAGE == 0:
                p += 40 if p % WAL_SEGMENT_SIZE == 0 else 24
                continue
            step = min(offset - p, PAGE - p % PAGE)
            data += step
            p += step
        self.add(_record(0, 0x00, b"\0" * (data - 24 - 5)))
        assert self.pos == offset

    def segments(self) -> list[tuple[Segment, bytes]]:
        count = -(-self.pos // WAL_SEGMENT_SIZE)
        raw = bytes(self.buf) + b"\0" * (count * WAL_SEGMENT_SIZE - self.pos)
        first = self.base // WAL_SEGMENT_SIZE
        return [(Segment(self.tli, first + k),
                 raw[k * WAL_SEGMENT_SIZE:(k + 1) * WAL_SEGMENT_SIZE]) for k in range(count)]


T0 = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)


def test_commit_and_abort_times_are_read_and_other_records_skipped() -> None:
    w = WalWriter(3)
    w.add(_record(10, 0x00, b"x" * 100))  # a heap insert: not a transaction record
    w.add(_commit(T0))
    w.add(_commit(T0 + timedelta(seconds=1), info=0x20))  # abort
    w.add(_record(1, 0x50, b"y" * 16))  # xact assignment (0x50): carries no time
    w.add(_commit(T0 + timedelta(seconds=2), info=0x30))  # commit prepared
    (info,) = scan_segments((s, d, "seg") for s, d in w.segments())
    assert info.sysid == SYSID
    assert info.xact_times == [T0, T0 + timedelta(seconds=1), T0 + timedelta(seconds=2)]
    assert info.last_time == T0 + timedelta(seconds=2)


def test_records_split_across_pages_are_joined() -> None:
    w = WalWriter(1)
    w.add(_record(10, 0, b"z" * (3 * PAGE)))  # spans four pages
    w.fill_to(PAGE * 5 - 16)  # the commit's header starts 16 bytes before a page end
    w.add(_commit(T0))
    w.add(_commit(T0 + timedelta(minutes=1)))
    (info,) = scan_segments((s, d, "seg") for s, d in w.segments())
    assert info.xact_times == [T0, T0 + timedelta(minutes=1)]


def test_commit_split_across_segments_is_found_in_order_and_skipped_alone() -> None:
    w = WalWriter(7)
    w.add(_commit(T0))
    w.fill_to(WAL_SEGMENT_SIZE - 16)
    w.add(_commit(T0 + timedelta(seconds=5)))  # 16 bytes here, the rest in the next segment
    w.add(_commit(T0 + timedelta(seconds=9)))
    first, second = w.segments()
    together = scan_segments([(first[0], first[1], "a"), (second[0], second[1], "b")])
    assert together[0].xact_times == [T0]
    assert together[1].xact_times == [T0 + timedelta(seconds=5), T0 + timedelta(seconds=9)]
    alone = WalScanner().scan(second[0], second[1], "b")  # no predecessor: skip the remainder
    assert alone.xact_times == [T0 + timedelta(seconds=9)]


def test_xlog_switch_ends_the_segment_even_if_bytes_follow() -> None:
    w = WalWriter(2)
    w.add(_commit(T0))
    w.add(_record(0, 0x40, b""))  # XLOG_SWITCH
    w.add(_commit(T0 + timedelta(hours=1)))  # garbage after a switch must not count
    (info,) = scan_segments((s, d, "seg") for s, d in w.segments())
    assert info.xact_times == [T0]


def test_a_recycled_page_ends_the_written_wal() -> None:
    w = WalWriter(2)
    w.add(_commit(T0))
    w.fill_to(2 * PAGE)
    w.add(_commit(T0 + timedelta(seconds=1)))
    (seg, data) = w.segments()[0]
    stale = bytearray(data)
    struct.pack_into("<Q", stale, 2 * PAGE + 8, 0x1234 * PAGE)  # page address of old WAL
    info = WalScanner().scan(seg, bytes(stale), "seg")
    assert info.xact_times == [T0]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d[:1000], "expected 16777216"),
        (lambda d: struct.pack("<H", 0xD10D) + d[2:], "not PostgreSQL 15"),
        (lambda d: d[:8] + struct.pack("<Q", 5 * WAL_SEGMENT_SIZE) + d[16:], "renamed or recycled"),
        (lambda d: d[:2] + b"\0\0" + d[4:], "long header"),
    ],
    ids=["short", "other-major-version", "renamed", "no-long-header"],
)
def test_bad_segments_fail_naming_the_object(mutate: object, message: str) -> None:
    w = WalWriter(3)
    w.add(_commit(T0))
    (seg, data) = w.segments()[0]
    with pytest.raises(BackupCorrupt, match=message) as caught:
        WalScanner().scan(seg, mutate(data), "wal_005/000000010000000000000003.lzo")  # type: ignore[operator]
    assert "wal_005/000000010000000000000003.lzo" in str(caught.value)
