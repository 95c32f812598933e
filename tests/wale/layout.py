"""Names in a WAL-E archive and the LSN arithmetic behind them (pure functions).

Why a module: the archiver, the base-backup maker, the fault tools and the tests must agree on
every object name, and the names encode WAL positions the way WAL-E computed them with
`pg_walfile_name_offset()`: base backups are `base_<24-hex WAL file>_<8-digit DECIMAL offset>`,
WAL objects `wal_005/<WAL file>.lzo`. Checked against WAL-E's source (wal_e/operator/backup.py,
wal_e/worker/pg/psql_worker.py: `lpad(file_offset::text, 8, '0')`) and Dingo's published
listings (`base_000000010000000000000002_00000040` next to
`wal_005/000000010000000000000002.00000028.backup.lzo`: 0x28 = 40).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

WAL_SEGMENT_SIZE = 16 * 1024 * 1024
"""PostgreSQL's default `--wal-segsize`; initdb on the VMs and locally uses it."""
VERSION = "005"
"""WAL-E's file structure version: `basebackups_005`, `wal_005`."""

GUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
SEGMENT_RE = re.compile(r"^[0-9A-F]{24}$")
_LSN_RE = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")


def parse_lsn(text: str) -> int:
    """`0/3000028` → 50331688."""
    match = _LSN_RE.match(text.strip())
    if not match:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def segment_name(timeline: int, segno: int) -> str:
    """XLogFileName: timeline, then the segment number split at 4 GiB of WAL."""
    per_xlogid = 0x1_0000_0000 // WAL_SEGMENT_SIZE
    return f"{timeline:08X}{segno // per_xlogid:08X}{segno % per_xlogid:08X}"


def segment_number(name: str) -> int:
    if not SEGMENT_RE.match(name):
        raise ValueError(f"not a WAL segment name: {name!r}")
    per_xlogid = 0x1_0000_0000 // WAL_SEGMENT_SIZE
    return int(name[8:16], 16) * per_xlogid + int(name[16:24], 16)


def segment_timeline(name: str) -> int:
    if not SEGMENT_RE.match(name):
        raise ValueError(f"not a WAL segment name: {name!r}")
    return int(name[:8], 16)


def walfile_name_offset(timeline: int, lsn: int) -> tuple[str, int]:
    """What `pg_walfile_name_offset(lsn)` returns, which WAL-E stored: the file name is taken
    with XLByteToPrevSeg (an LSN exactly on a segment boundary names the previous segment),
    the offset is the LSN modulo the segment size."""
    return segment_name(timeline, (lsn - 1) // WAL_SEGMENT_SIZE), lsn % WAL_SEGMENT_SIZE


def walfile_containing(timeline: int, lsn: int) -> str:
    """XLByteToSeg: the segment holding `lsn` (what backup_label's `(file …)` shows)."""
    return segment_name(timeline, lsn // WAL_SEGMENT_SIZE)


@dataclass(frozen=True)
class Layout:
    """Object keys under one service's prefix (`backups/<guid>/wal/`)."""

    prefix: str
    """Ends with `/`."""

    @classmethod
    def for_service(cls, guid: str, root: str = "backups") -> Layout:
        if not GUID_RE.match(guid):
            raise ValueError(f"service GUID {guid!r} is not a lowercase UUID")
        return cls(f"{root}/{guid}/wal/")

    @property
    def basebackups(self) -> str:
        return f"{self.prefix}basebackups_{VERSION}/"

    @property
    def wal(self) -> str:
        return f"{self.prefix}wal_{VERSION}/"

    @property
    def sysid(self) -> str:
        return f"{self.prefix}sysids/sysid"

    def backup_name(self, start_segment: str, start_offset: int) -> str:
        return f"base_{start_segment}_{start_offset:08d}"

    def backup_dir(self, name: str) -> str:
        return f"{self.basebackups}{name}/"

    def extended_version(self, name: str) -> str:
        return f"{self.backup_dir(name)}extended_version.txt"

    def partition(self, name: str, index: int) -> str:
        return f"{self.backup_dir(name)}tar_partitions/part_{index:08d}.tar.lzo"

    def sentinel(self, name: str) -> str:
        return f"{self.basebackups}{name}_backup_stop_sentinel.json"

    def wal_object(self, wal_file: str) -> str:
        return f"{self.wal}{wal_file}.lzo"
