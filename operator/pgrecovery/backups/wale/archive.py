"""List a WAL-E archive in S3 and read its small objects.

Why this module exists: one listing of `<prefix>` tells which base backups are complete (a
stop sentinel exists, as `wal-e backup-list` requires), which WAL segments, timeline histories
and backup histories were archived, and where `sysids/sysid` is. Everything after this works
on the returned `Archive`, never on raw keys. Objects that fit no known name are reported,
not guessed at.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from pgrecovery.adapters.objectstore import ObjectInfo, ObjectStore
from pgrecovery.backups.wale import lzop
from pgrecovery.backups.wale.history import (
    BackupHistory,
    TimelineSwitch,
    parse_backup_history,
    parse_timeline_history,
)
from pgrecovery.backups.wale.layout import (
    BASEBACKUPS,
    SYSID_KEY,
    WAL_DIR,
    BaseBackupName,
    Segment,
    classify_basebackup_key,
    classify_wal_key,
)
from pgrecovery.errors import BackupCorrupt, BackupIncomplete, BackupNotFound

log = logging.getLogger(__name__)

# Sentinels, history files and sysid are a few hundred bytes; anything far larger is not one.
SMALL_OBJECT_LIMIT = 1024 * 1024


@dataclass
class BaseBackup:
    name: BaseBackupName
    parts: list[ObjectInfo] = field(default_factory=list)
    sentinel: ObjectInfo | None = None
    expanded_size: int | None = None
    history: BackupHistory | None = None

    @property
    def compressed_size(self) -> int:
        return sum(p.size for p in self.parts)


@dataclass
class Archive:
    prefix: str
    description: str
    backups: dict[str, BaseBackup] = field(default_factory=dict)
    segments: dict[str, ObjectInfo] = field(default_factory=dict)
    """WAL file name (24 hex) → its `.lzo` object."""
    histories: dict[int, ObjectInfo] = field(default_factory=dict)
    backup_histories: dict[str, ObjectInfo] = field(default_factory=dict)
    sysid_object: ObjectInfo | None = None
    ignored: list[str] = field(default_factory=list)
    sysid: int | None = None
    timeline_history: dict[int, list[TimelineSwitch]] = field(default_factory=dict)

    def where(self, rel: str) -> str:
        return f"{self.description}{self.prefix}{rel}"

    @property
    def complete_backups(self) -> list[BaseBackup]:
        return sorted(
            (b for b in self.backups.values() if b.sentinel is not None and b.parts),
            key=lambda b: b.name.start_lsn,
        )

    def segment_key(self, name: str) -> str:
        return f"{self.prefix}{WAL_DIR}{name}.lzo"


async def list_archive(store: ObjectStore, prefix: str) -> Archive:
    archive = Archive(prefix=prefix, description=f"{store.description.rstrip('/')}/")
    objects = await store.list(prefix)
    if not objects:
        raise BackupNotFound(f"no WAL-E archive at {archive.where('')}: the prefix is empty")
    for obj in objects:
        rel = obj.key[len(prefix):]
        if rel.startswith(BASEBACKUPS):
            kind = classify_basebackup_key(rel[len(BASEBACKUPS):])
            if kind is None:
                archive.ignored.append(obj.key)
                continue
            what, base, index = kind
            backup = archive.backups.setdefault(base, BaseBackup(BaseBackupName.parse(base)))
            if what == "sentinel":
                backup.sentinel = obj
            elif what == "part" and index is not None:
                backup.parts.append(obj)
        elif rel.startswith(WAL_DIR):
            wal = classify_wal_key(rel[len(WAL_DIR):])
            if wal is None:
                archive.ignored.append(obj.key)
            elif wal[0] == "segment":
                archive.segments[wal[1]] = obj
            elif wal[0] == "history":
                archive.histories[int(wal[1][:8], 16)] = obj
            elif wal[0] == "backup":
                archive.backup_histories[wal[1]] = obj
        elif rel == SYSID_KEY:
            archive.sysid_object = obj
        else:
            archive.ignored.append(obj.key)
    for backup in archive.backups.values():
        backup.parts.sort(key=lambda o: o.key)
        _check_part_numbers(archive, backup)
    for ignored in archive.ignored[:20]:
        log.warning("ignored object in WAL-E archive: %s", ignored)
    if not archive.complete_backups:
        raise BackupNotFound(
            f"no complete base backup in {archive.where(BASEBACKUPS)} (a base backup counts "
            "once its _backup_stop_sentinel.json exists)"
        )
    return archive


def _check_part_numbers(archive: Archive, backup: BaseBackup) -> None:
    names = [o.key.rsplit("/", 1)[-1] for o in backup.parts]
    expected = [f"part_{i:08d}.tar.lzo" for i in range(len(names))]
    if backup.sentinel is not None and names != expected:
        missing = sorted(set(expected) - set(names)) or names
        raise BackupIncomplete(
            f"base backup {backup.name.name} in {archive.where(BASEBACKUPS)}: tar partitions "
            f"are not numbered 0..{len(names) - 1} (first unexpected: {missing[0]})"
        )


async def read_small(store: ObjectStore, obj: ObjectInfo) -> bytes:
    if obj.size > SMALL_OBJECT_LIMIT:
        raise BackupCorrupt(f"{obj.key}: {obj.size} bytes is far too large for this file")
    return await store.read_range(obj.key, 0, obj.size) if obj.size else b""


async def load_details(store: ObjectStore, archive: Archive) -> None:
    """Read sysid, sentinels, backup histories and timeline histories (all small)."""
    if archive.sysid_object is not None:
        text = (await read_small(store, archive.sysid_object)).decode("ascii", "replace").strip()
        if not text.isdigit():
            raise BackupCorrupt(f"{archive.sysid_object.key}: not a system identifier: "
                                f"{text[:40]!r}")
        archive.sysid = int(text)
    for backup in archive.complete_backups:
        if backup.sentinel is None:  # pragma: no cover - complete_backups have one
            continue
        raw = await read_small(store, backup.sentinel)
        try:
            sentinel = json.loads(raw)
            size = sentinel.get("expanded_size_bytes")
            backup.expanded_size = int(size) if size is not None else None
        except (ValueError, AttributeError, TypeError):
            raise BackupCorrupt(f"{backup.sentinel.key}: not a WAL-E stop sentinel (JSON)") \
                from None
        hist_obj = archive.backup_histories.get(backup.name.history_file)
        if hist_obj is not None:
            plain = lzop.decompress_bytes(await read_small(store, hist_obj), hist_obj.key)
            backup.history = parse_backup_history(plain.decode("utf-8", "replace"), hist_obj.key)
    for tli, obj in sorted(archive.histories.items()):
        plain = lzop.decompress_bytes(await read_small(store, obj), obj.key)
        archive.timeline_history[tli] = parse_timeline_history(
            plain.decode("utf-8", "replace"), obj.key
        )


def segment_names(archive: Archive) -> list[Segment]:
    return sorted(Segment.parse(n) for n in archive.segments)
