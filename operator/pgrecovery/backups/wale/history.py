"""Small text and binary files of an archive: timeline history, backup history, pg_control.

Why this module exists: choosing a base backup and the WAL it needs depends on three small
files PostgreSQL writes, each with its own format; parsing them here keeps the planning logic
(`plan.py`) free of byte layouts.

- `<tli>.history` (timeline history): lines `<parent tli>\t<switch LSN>\t<reason>`.
- `<WAL file>.<hex offset>.backup` (backup history, written by pg_backup_stop for every base
  backup, pg_basebackup included, and archived like WAL): `START WAL LOCATION`, `STOP WAL
  LOCATION`, `START TIME`, `STOP TIME`, `START TIMELINE`. The times are what a base backup is
  chosen by; PostgreSQL prints them in `log_timezone` with a zone abbreviation.
- `global/pg_control` inside the base backup: the first 8 bytes are the system identifier.
"""

from __future__ import annotations

import re
import struct
import tarfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pgrecovery.backups.wale.layout import parse_lsn
from pgrecovery.errors import BackupCorrupt


@dataclass(frozen=True)
class TimelineSwitch:
    parent: int
    switch_lsn: int


def parse_timeline_history(text: str, what: str) -> list[TimelineSwitch]:
    """Entries in file order (oldest ancestor first)."""
    out: list[TimelineSwitch] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        try:
            out.append(TimelineSwitch(int(fields[0]), parse_lsn(fields[1])))
        except (IndexError, ValueError):
            raise BackupCorrupt(f"{what}: unreadable timeline history line {line!r}") from None
    return out


@dataclass(frozen=True)
class BackupHistory:
    start_lsn: int
    stop_lsn: int
    start_time: datetime
    stop_time: datetime
    start_tli: int


_FIELD = re.compile(r"^([A-Z ]+): (.*)$")
_LOCATION = re.compile(r"^([0-9A-F]+/[0-9A-F]+)")
_TIME = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}) (\S+)$")
_OFFSET = re.compile(r"^([+-])(\d{2}):?(\d{2})?$")


def _parse_time(text: str, what: str) -> datetime:
    m = _TIME.match(text.strip())
    if not m:
        raise BackupCorrupt(f"{what}: unreadable time {text!r}")
    naive = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")
    zone = m.group(2)
    off = _OFFSET.match(zone)
    if off:
        delta = timedelta(hours=int(off.group(2)), minutes=int(off.group(3) or 0))
        return naive.replace(tzinfo=timezone(delta if off.group(1) == "+" else -delta))
    if zone in ("UTC", "GMT", "Z", "UCT"):
        return naive.replace(tzinfo=UTC)
    try:
        return naive.replace(tzinfo=ZoneInfo(zone))
    except (ZoneInfoNotFoundError, ValueError):
        raise BackupCorrupt(
            f"{what}: time zone {zone!r} is ambiguous or unknown; set log_timezone to UTC on "
            "the source or choose the backup by hand"
        ) from None


def parse_backup_history(text: str, what: str) -> BackupHistory:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        m = _FIELD.match(line.strip())
        if m:
            fields[m.group(1)] = m.group(2)
    try:
        start = _LOCATION.match(fields["START WAL LOCATION"])
        stop = _LOCATION.match(fields["STOP WAL LOCATION"])
        if not start or not stop:
            raise KeyError("WAL LOCATION")
        return BackupHistory(
            start_lsn=parse_lsn(start.group(1)),
            stop_lsn=parse_lsn(stop.group(1)),
            start_time=_parse_time(fields["START TIME"], what),
            stop_time=_parse_time(fields["STOP TIME"], what),
            start_tli=int(fields.get("START TIMELINE", "0") or 0),
        )
    except KeyError as exc:
        raise BackupCorrupt(f"{what}: backup history file lacks {exc.args[0]}") from None


PG_CONTROL = "global/pg_control"


class ReadableBytes(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


def sysid_from_tar(fileobj: ReadableBytes, what: str) -> int | None:
    """The system identifier in `global/pg_control` of a tar stream; None if not in it.

    Reads the whole stream (members are skipped, not stored), so the caller's decoder checks
    every lzop block on the way."""
    found: int | None = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r|") as tar:  # type: ignore[call-overload]
            for member in tar:
                name = member.name.removeprefix("./")
                if name == PG_CONTROL and member.isfile():
                    handle = tar.extractfile(member)
                    head = handle.read(8) if handle is not None else b""
                    if len(head) == 8:
                        found = int(struct.unpack("<Q", head)[0])
    except tarfile.TarError as exc:
        raise BackupCorrupt(f"{what}: not a readable tar stream ({exc})") from None
    return found
