"""Names in a WAL-E archive: keys, WAL file names, segment numbers, base backup names.

Why this module exists: every other part of the WAL-E path reasons in segments and timelines,
while the store holds keys. This module is the one translation, with the layout written down
once (formats.md, "WAL-E archives"):

    <prefix>basebackups_005/base_<24-hex WAL file>_<8-digit decimal offset>/
        extended_version.txt, tar_partitions/part_00000000.tar.lzo, …
    <prefix>basebackups_005/base_<…>_backup_stop_sentinel.json
    <prefix>wal_005/<WAL file>.lzo             segments, `<tli>.history`, `<file>.<hex>.backup`
    <prefix>sysids/sysid

Decision: the archive prefix is `spec.source.s3.prefix` when set, else Dingo's
`backups/<service-guid>/wal/` (the deleted instance's GUID is `spec.source.backupGuid`).
WAL segment size: 16 MiB (PostgreSQL's default, and Dingo's); the scanner checks every
segment's header against it and stops with a clear error otherwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pgrecovery.errors import InvalidSpec

WAL_SEGMENT_SIZE = 16 * 1024 * 1024
SEGMENTS_PER_XLOGID = 0x100000000 // WAL_SEGMENT_SIZE

BASEBACKUPS = "basebackups_005/"
WAL_DIR = "wal_005/"
SYSID_KEY = "sysids/sysid"

_WAL_FILE = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")
_BASE_NAME = re.compile(r"^base_([0-9A-F]{24})_([0-9]{8})$")
_SENTINEL = re.compile(r"^base_([0-9A-F]{24})_([0-9]{8})_backup_stop_sentinel\.json$")
_PART = re.compile(r"^part_([0-9]{8})\.tar\.lzo$")
_HISTORY = re.compile(r"^([0-9A-F]{8})\.history\.lzo$")
_BACKUP_HISTORY = re.compile(r"^([0-9A-F]{24})\.([0-9A-F]{8})\.backup\.lzo$")
_PARTIAL = re.compile(r"^[0-9A-F]{24}\.partial\.lzo$")


def default_prefix(guid: str) -> str:
    return f"backups/{guid}/wal/"


def normalise_prefix(prefix: str) -> str:
    if ".." in prefix.split("/"):
        raise InvalidSpec("must not contain '..'", field="spec.source.s3.prefix")
    prefix = prefix.lstrip("/")
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


@dataclass(frozen=True, order=True)
class Segment:
    """One WAL segment: timeline and absolute segment number."""

    tli: int
    segno: int

    @property
    def name(self) -> str:
        return (
            f"{self.tli:08X}{self.segno // SEGMENTS_PER_XLOGID:08X}"
            f"{self.segno % SEGMENTS_PER_XLOGID:08X}"
        )

    @property
    def start_lsn(self) -> int:
        return self.segno * WAL_SEGMENT_SIZE

    @classmethod
    def parse(cls, name: str) -> Segment:
        m = _WAL_FILE.match(name)
        if not m:
            raise ValueError(f"not a WAL file name: {name!r}")
        tli, log, seg = (int(g, 16) for g in m.groups())
        if seg >= SEGMENTS_PER_XLOGID:
            raise ValueError(f"not a WAL file name for 16 MiB segments: {name!r}")
        return cls(tli, log * SEGMENTS_PER_XLOGID + seg)


def segno_of(lsn: int) -> int:
    return lsn // WAL_SEGMENT_SIZE


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    hi, _, lo = text.strip().partition("/")
    return (int(hi, 16) << 32) | int(lo, 16)


@dataclass(frozen=True)
class BaseBackupName:
    """`base_<WAL file>_<decimal offset>`: where the backup's WAL starts."""

    segment: Segment
    offset: int

    @property
    def name(self) -> str:
        return f"base_{self.segment.name}_{self.offset:08d}"

    @property
    def start_lsn(self) -> int:
        # WAL-E named backups with pg_walfile_name_offset(), which names the *previous*
        # segment for an LSN exactly on a segment boundary (offset 0).
        if self.offset == 0:
            return self.segment.start_lsn + WAL_SEGMENT_SIZE
        return self.segment.start_lsn + self.offset

    @property
    def first_segno(self) -> int:
        return self.start_lsn // WAL_SEGMENT_SIZE

    @property
    def history_file(self) -> str:
        """The backup history file PostgreSQL archives for it: `<WAL file>.<hex>.backup`."""
        seg = Segment(self.segment.tli, self.first_segno)
        return f"{seg.name}.{self.offset:08X}.backup"

    @classmethod
    def parse(cls, name: str) -> BaseBackupName:
        m = _BASE_NAME.match(name)
        if not m:
            raise ValueError(f"not a base backup name: {name!r}")
        return cls(Segment.parse(m.group(1)), int(m.group(2)))


def classify_basebackup_key(rel: str) -> tuple[str, str, int | None] | None:
    """For a key below `basebackups_005/`: ("sentinel", base name, None),
    ("part", base name, index), ("other", base name, None), or None if unrecognised."""
    head, _, rest = rel.partition("/")
    m = _SENTINEL.match(head)
    if m and not rest:
        return ("sentinel", f"base_{m.group(1)}_{m.group(2)}", None)
    if not _BASE_NAME.match(head):
        return None
    pm = _PART.match(rest.removeprefix("tar_partitions/")) if rest.startswith(
        "tar_partitions/") else None
    if pm:
        return ("part", head, int(pm.group(1)))
    return ("other", head, None)


def classify_wal_key(rel: str) -> tuple[str, str] | None:
    """For a key below `wal_005/`: ("segment"|"history"|"backup"|"partial", file name)."""
    if rel.endswith(".lzo") and _WAL_FILE.match(rel[:-4]):
        return ("segment", rel[:-4])
    if _HISTORY.match(rel):
        return ("history", rel[:-4])
    if _BACKUP_HISTORY.match(rel):
        return ("backup", rel[:-4])
    if _PARTIAL.match(rel):
        return ("partial", rel[:-4])
    return None
