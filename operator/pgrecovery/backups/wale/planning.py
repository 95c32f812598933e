"""Recovery window, base-backup choice and the WAL a recovery needs — pure logic.

Why this module exists: these are the decisions that must all be made, and shown, before
anything destructive happens; keeping them free of I/O lets unit tests cover every branch
(timeline switches, gaps, targets before/inside/after the window).

Decisions recorded here:
- Window START: the earliest complete base backup's STOP TIME + 1 s. PostgreSQL cannot stop
  before a base backup is consistent ("requested recovery stop point is before consistent
  recovery point"), and STOP TIME is printed with whole seconds, so +1 s is the first target
  that is safe whatever the fraction was.
- Window END: the newest commit/abort time in the archive's last segments (see walscan.py
  for why commit times and not LastModified).
- A base backup is eligible for a target when its STOP TIME + 1 s ≤ target; the latest
  eligible one (least WAL to replay) is chosen. Without a target: the latest backup.
- Timelines: like PostgreSQL's `recovery_target_timeline = 'latest'`, the newest timeline's
  history decides which timeline each segment is read from (a segment is taken from the
  newest timeline that began at or before it). A base backup on a branch the newest timeline
  does not descend from is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from pgrecovery.backups.wale.archive import Archive, BaseBackup
from pgrecovery.backups.wale.layout import Segment, format_lsn, segno_of
from pgrecovery.errors import BackupIncomplete, BackupNotFound, FatalError

STOP_TIME_MARGIN = timedelta(seconds=1)


class TargetOutsideWindow(FatalError):
    """The target time lies outside what the archive can recover (and no bestEffort)."""

    reason = "TargetOutsideWindow"


@dataclass(frozen=True)
class TimelineEntry:
    tli: int
    begin_lsn: int
    end_lsn: int | None


def timeline_path(archive: Archive) -> list[TimelineEntry]:
    """Timelines from the first to the newest, with the LSN range each one covers."""
    known = {Segment.parse(n).tli for n in archive.segments} | set(archive.histories)
    if not known:
        raise BackupIncomplete(f"no WAL in {archive.where('wal_005/')}")
    newest = max(known)
    switches = archive.timeline_history.get(newest, [])
    if newest > 1 and not switches and archive.histories:
        raise BackupIncomplete(
            f"timeline {newest} has WAL but {archive.where(f'wal_005/{newest:08X}.history.lzo')}"
            " is missing"
        )
    path: list[TimelineEntry] = []
    begin = 0
    for sw in switches:
        path.append(TimelineEntry(sw.parent, begin, sw.switch_lsn))
        begin = sw.switch_lsn
    path.append(TimelineEntry(newest, begin, None))
    return path


def segment_for(path: list[TimelineEntry], segno: int) -> Segment:
    """The file PostgreSQL restores for segment `segno` when following `path`."""
    for entry in reversed(path):
        if segno_of(entry.begin_lsn) <= segno:
            return Segment(entry.tli, segno)
    return Segment(path[0].tli, segno)


def last_segment(archive: Archive, path: list[TimelineEntry]) -> Segment | None:
    """The newest archived segment that lies on `path`."""
    best: Segment | None = None
    for name in archive.segments:
        seg = Segment.parse(name)
        if segment_for(path, seg.segno) == seg and (best is None or seg.segno > best.segno):
            best = seg
    return best


def check_backup_on_path(backup: BaseBackup, path: list[TimelineEntry], archive: Archive) -> None:
    tli = backup.history.start_tli if backup.history and backup.history.start_tli else \
        backup.name.segment.tli
    for entry in path:
        if entry.tli == tli:
            if entry.end_lsn is not None and backup.name.start_lsn >= entry.end_lsn:
                break
            return
    raise BackupNotFound(
        f"base backup {backup.name.name} (timeline {tli}, {format_lsn(backup.name.start_lsn)}) "
        f"is not an ancestor of the newest timeline {path[-1].tli} in {archive.where('')}"
    )


@dataclass(frozen=True)
class RecoveryWindow:
    start: datetime | None
    """First recoverable time (earliest base backup's stop time + 1 s); None if unknown."""
    end: datetime | None
    """Newest commit/abort time in the archive; None if the archive has no transaction."""
    earliest_backup: str
    latest_backup: str
    last_segment: str

    def describe(self) -> str:
        start = self.start.isoformat() if self.start else "unknown (no backup history file)"
        end = self.end.isoformat() if self.end else "unknown (no transaction in the WAL)"
        return (f"{start} .. {end} (base backups {self.earliest_backup} .. "
                f"{self.latest_backup}, WAL up to {self.last_segment})")


def recovery_window(archive: Archive, end: datetime | None, last: Segment) -> RecoveryWindow:
    backups = archive.complete_backups
    starts = [b.history.stop_time + STOP_TIME_MARGIN for b in backups if b.history]
    return RecoveryWindow(
        start=min(starts) if starts else None,
        end=end,
        earliest_backup=backups[0].name.name,
        latest_backup=backups[-1].name.name,
        last_segment=last.name,
    )


@dataclass(frozen=True)
class Choice:
    backup: BaseBackup
    target_time: datetime | None
    """The recovery_target_time to set; None = replay everything (end of the archive)."""
    note: str


def choose_backup(
    archive: Archive, window: RecoveryWindow, target: datetime | None, best_effort: bool
) -> Choice:
    backups = archive.complete_backups
    latest = backups[-1]
    if target is None:
        return Choice(latest, None, "no target time: replay to the end of the archive")
    if window.end is None or target > window.end:
        if best_effort:
            return Choice(latest, None, f"target {target.isoformat()} lies beyond the archive; "
                                        "bestEffort: replay to the end of the archive")
        raise TargetOutsideWindow(
            f"target time {target.isoformat()} lies beyond the archive; recoverable window: "
            f"{window.describe()}. Set pointInTime.bestEffort to recover to the last "
            "archived transaction"
        )
    eligible = [b for b in backups if b.history and b.history.stop_time + STOP_TIME_MARGIN
                <= target]
    if not eligible:
        raise TargetOutsideWindow(
            f"target time {target.isoformat()} lies before the first consistent point of any "
            f"base backup; recoverable window: {window.describe()}"
        )
    chosen = max(eligible, key=lambda b: b.name.start_lsn)
    return Choice(chosen, target, "latest base backup finished before the target")


def required_segments(
    archive: Archive, path: list[TimelineEntry], first_segno: int, last_segno: int, why: str
) -> list[Segment]:
    """Segments first..last along `path`; BackupIncomplete naming the first missing one."""
    out: list[Segment] = []
    for segno in range(first_segno, last_segno + 1):
        seg = segment_for(path, segno)
        if seg.name not in archive.segments:
            raise BackupIncomplete(
                f"WAL segment {seg.name} is missing from {archive.where('wal_005/')} "
                f"({why}); the archive has a gap and cannot be replayed past "
                f"{format_lsn(seg.start_lsn)}"
            )
        out.append(seg)
    return out
