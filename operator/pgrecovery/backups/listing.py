"""List the backups of one a9s-pg backup GUID and choose the one to restore.

Why this module exists: the Fetching phase must know, before downloading a byte, which backup
it restores, that every part is there, and how big it is. `build_listing` is pure (it turns an
object listing into `Backup` records and reports what it cannot use); `list_backups` adds the
store round trip; `select_backup` applies the rule "latest unless an id is given" and refuses
a backup with known problems.

Rules (see reference/formats.md):
- Parts are `<id>-<n>`; whether `n` starts at 0 or 1 is unknown publicly, so both are
  accepted, but the indexes must then be contiguous: a gap is a missing part.
- The ciphertext is `Salted__` + 8-byte salt + whole 16-byte AES blocks, so a total size that
  is not a multiple of 16 means the last part is truncated, detectable from sizes alone.
- Names that do not parse are reported in `BackupListing.ignored`, never fatal.
- The `<id>.json` metadata object's schema is not public [U]: it is read when present, a part
  count and a total size are taken from it when it plainly has them (`parse_metadata`), and
  they only ever add problems (a trailing part missing, a size that differs) — a metadata
  object that says nothing usable changes nothing.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from pgrecovery.adapters.objectstore import ObjectInfo, ObjectStore
from pgrecovery.adapters.retry import RetryPolicy, retry_async
from pgrecovery.backups.naming import BackupId, ParsedKey, guess_guid, parse_backup_id, parse_key
from pgrecovery.errors import BackupIncomplete, BackupNotFound, RecoveryError

# `Salted__` (8) + salt (8); the ciphertext after it is whole AES blocks.
OPENSSL_HEADER_SIZE = 16
AES_BLOCK = 16


@dataclass(frozen=True)
class BackupPart:
    """One object holding a slice of the encrypted stream."""

    key: str
    """Full key in the store (with prefix)."""
    name: str
    """Key without the prefix: the file name used in a download directory."""
    index: int | None
    """The `-<n>` suffix, or None for a single unsplit object (Azure)."""
    size: int
    etag: str | None = None


@dataclass(frozen=True)
class Backup:
    """One backup: its id, its parts in natural order, and what is wrong with it."""

    id: BackupId
    parts: tuple[BackupPart, ...]
    metadata_key: str | None = None
    metadata_size: int = 0
    problems: tuple[str, ...] = ()
    """Reasons this backup cannot be restored (missing parts, truncation…)."""
    notes: tuple[str, ...] = ()
    """Oddities worth showing that do not stop a restore."""

    @property
    def backup_id(self) -> str:
        return self.id.value

    @property
    def taken_at(self) -> datetime:
        return self.id.taken_at

    @property
    def total_size(self) -> int:
        return sum(p.size for p in self.parts)

    @property
    def part_count(self) -> int:
        return len(self.parts)

    @property
    def has_metadata(self) -> bool:
        return self.metadata_key is not None

    @property
    def complete(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class IgnoredKey:
    key: str
    reason: str


@dataclass(frozen=True)
class BackupListing:
    """All backups of one GUID at one location, oldest first."""

    guid: str
    location: str
    backups: tuple[Backup, ...]
    ignored: tuple[IgnoredKey, ...] = ()
    other_guids: tuple[str, ...] = field(default=())
    """When no backup of `guid` exists: GUIDs that do have backups there (a hint)."""
    store_empty: bool = False
    """True when the bucket/container (under the prefix) holds no object at all."""

    @property
    def latest(self) -> Backup | None:
        return self.backups[-1] if self.backups else None

    def get(self, backup_id: str) -> Backup | None:
        for backup in self.backups:
            if backup.backup_id == backup_id:
                return backup
        return None


def _describe_indexes(indexes: list[int]) -> str:
    """`0-4, 6-11` for a sorted list of ints."""
    runs: list[str] = []
    start = prev = indexes[0]
    following: list[int | None] = [*indexes[1:], None]
    for i in following:
        if i is not None and i == prev + 1:
            prev = i
            continue
        runs.append(f"{start}" if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(runs)


def _assemble(backup_id: BackupId, objs: list[tuple[ParsedKey, ObjectInfo, str]]) -> Backup:
    parts = [
        BackupPart(key=o.key, name=name, index=p.index, size=o.size, etag=o.etag)
        for p, o, name in objs
        if p.kind in ("part", "blob")
    ]
    metadata_info = next((o for p, o, _ in objs if p.kind == "metadata"), None)
    metadata = metadata_info.key if metadata_info is not None else None
    problems: list[str] = []
    notes: list[str] = []
    numbered = sorted((p for p in parts if p.index is not None), key=lambda p: p.index or 0)
    single = [p for p in parts if p.index is None]
    if not parts:
        problems.append("only metadata, no data objects (upload unfinished or parts deleted)")
    elif single and numbered:
        problems.append(
            f"both a single object {single[0].name!r} and {len(numbered)} numbered parts; "
            "cannot tell which one is the backup"
        )
    elif numbered:
        indexes = [p.index for p in numbered if p.index is not None]
        first = indexes[0]
        if first > 1:
            problems.append(
                f"the first part is missing: the lowest part index is {first} "
                "(parts are numbered from 0 or 1)"
            )
        missing = sorted(set(range(first, indexes[-1] + 1)) - set(indexes))
        if missing:
            shown = ", ".join(str(i) for i in missing[:10]) + (" …" if len(missing) > 10 else "")
            problems.append(f"part(s) {shown} missing: found parts {_describe_indexes(indexes)}")
        # `split -b` makes every part but the last the same size; a shorter one in the
        # middle was most likely cut short on upload. The gzip check would catch it later,
        # but saying so now points at the cause.
        if len(numbered) > 1:
            full = numbered[0].size
            short = [p for p in numbered[1:-1] if p.size != full]
            if short or numbered[-1].size > full:
                names = ", ".join(p.name for p in (short or [numbered[-1]])[:3])
                notes.append(f"part sizes differ from the first part ({full} bytes): {names}")
        parts = numbered
    total = sum(p.size for p in parts)
    if parts and not problems:
        if total < OPENSSL_HEADER_SIZE + AES_BLOCK:
            problems.append(f"only {total} bytes: too small to hold an encrypted dump")
        elif (total - OPENSSL_HEADER_SIZE) % AES_BLOCK:
            problems.append(
                f"total size {total} is not 16 + a multiple of 16 bytes: the last part "
                f"({parts[-1].name}) is truncated"
            )
    if metadata is None:
        notes.append("no metadata object")
    return Backup(
        id=backup_id,
        parts=tuple(parts),
        metadata_key=metadata,
        metadata_size=metadata_info.size if metadata_info is not None else 0,
        problems=tuple(problems),
        notes=tuple(notes),
    )


@dataclass(frozen=True)
class BackupMetadata:
    """What a backup's `<id>.json` plainly says about its parts (None: it does not say)."""

    parts: int | None = None
    size: int | None = None


# Keys under which a part count or the encrypted size may appear; the schema is not public, so
# only unambiguous integer values (or a list of part names) are taken.
_COUNT_KEYS = ("parts", "part_count", "parts_count", "number_of_parts", "num_parts", "chunks")
_SIZE_KEYS = ("size", "total_size", "size_bytes", "encrypted_size", "bytes")
# Metadata larger than this is not a small JSON document: not read.
METADATA_READ_LIMIT = 1024 * 1024


def parse_metadata(raw: bytes) -> BackupMetadata:
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return BackupMetadata()
    if not isinstance(doc, dict):
        return BackupMetadata()

    def count() -> int | None:
        for key in _COUNT_KEYS:
            value = doc.get(key)
            if isinstance(value, bool):
                continue
            if isinstance(value, int) and value > 0:
                return value
            if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
                return len(value)
        return None

    def size() -> int | None:
        for key in _SIZE_KEYS:
            value = doc.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    return BackupMetadata(parts=count(), size=size())


def check_against_metadata(backup: Backup, meta: BackupMetadata) -> Backup:
    """Add what the metadata reveals: trailing parts missing (which sizes alone report as
    "the last part is truncated"), or a total size that differs. Numbered parts only."""
    numbered = [p for p in backup.parts if p.index is not None]
    if not numbered or (meta.parts is None and meta.size is None):
        return backup
    name = backup.metadata_key or f"{backup.backup_id}.json"
    problems = list(backup.problems)
    notes = list(backup.notes)
    first = numbered[0].index or 0
    last = numbered[-1].index or 0
    if meta.parts is not None and len(numbered) < meta.parts and not any(
        "missing" in p for p in problems
    ):
        expected_last = first + meta.parts - 1
        if expected_last > last:
            missing = list(range(last + 1, expected_last + 1))
            stem = numbered[-1].name[: -len(str(last))]
            shown = ", ".join(f"{stem}{i}" for i in missing[:5]) + (" …" if len(missing) > 5
                                                                     else "")
            # The sizes-only verdict blamed the last part found; the metadata names the cause.
            problems = [p for p in problems if "is truncated" not in p]
            problems.append(
                f"the last {len(missing)} part(s) missing: {name} lists {meta.parts} parts, "
                f"found {len(numbered)} (missing: {shown})"
            )
    total = sum(p.size for p in numbered)
    if meta.size is not None and total != meta.size and not problems:
        problems.append(f"the parts hold {total} bytes but {name} says {meta.size}: a part "
                        "is incomplete or was replaced")
    if meta.parts is not None:
        notes = [n for n in notes if n != "no metadata object"]
    return dataclasses.replace(backup, problems=tuple(problems), notes=tuple(notes))


def build_listing(
    guid: str, objects: Iterable[ObjectInfo], *, prefix: str = "", location: str = ""
) -> BackupListing:
    """Group a listing of `<prefix><guid>-…` objects into backups (pure)."""
    grouped: dict[BackupId, list[tuple[ParsedKey, ObjectInfo, str]]] = defaultdict(list)
    ignored: list[IgnoredKey] = []
    for obj in objects:
        if not obj.key.startswith(prefix):
            ignored.append(IgnoredKey(obj.key, f"outside the prefix {prefix!r}"))
            continue
        name = obj.key[len(prefix) :]
        parsed = parse_key(name, guid)
        if isinstance(parsed, str):
            ignored.append(IgnoredKey(obj.key, parsed))
            continue
        grouped[parsed.backup_id].append((parsed, obj, name))
    backups = tuple(_assemble(bid, objs) for bid, objs in sorted(grouped.items()))
    return BackupListing(guid=guid, location=location, backups=backups, ignored=tuple(ignored))


# How many keys to look at when a GUID has no backups, to tell "empty" from "wrong GUID".
_HINT_SCAN_LIMIT = 1000


async def list_backups(
    store: ObjectStore,
    guid: str,
    *,
    prefix: str = "",
    retry: RetryPolicy | None = None,
) -> BackupListing:
    """List every backup of `guid` under `prefix` in `store`."""
    policy = retry or RetryPolicy()
    objects = await retry_async(
        lambda: store.list(f"{prefix}{guid}-"), policy, what=f"list {store.description}"
    )
    listing = build_listing(guid, objects, prefix=prefix, location=store.description)
    if listing.backups:
        return await _with_metadata(store, listing)
    sample = await retry_async(
        lambda: store.list(prefix, limit=_HINT_SCAN_LIMIT),
        policy,
        what=f"list {store.description}",
    )
    others = sorted({g for o in sample if (g := guess_guid(o.key[len(prefix) :])) and g != guid})
    return BackupListing(
        guid=guid,
        location=listing.location,
        backups=(),
        ignored=listing.ignored,
        other_guids=tuple(others),
        store_empty=not sample,
    )


# The metadata of the newest backups is read (one small GET each): enough for "latest" and for
# the "newest complete backup" hint, bounded for a GUID with years of backups.
METADATA_NEWEST = 10


async def _with_metadata(store: ObjectStore, listing: BackupListing) -> BackupListing:
    checked = list(listing.backups)
    for i in range(max(0, len(checked) - METADATA_NEWEST), len(checked)):
        backup = checked[i]
        key, size = backup.metadata_key, backup.metadata_size
        if key is None or not 0 < size <= METADATA_READ_LIMIT:
            continue
        try:
            raw = await store.read_range(key, 0, size)
        except RecoveryError as exc:
            # Metadata only ever adds problems; unreadable, it adds a note, never a failure.
            checked[i] = dataclasses.replace(
                backup, notes=(*backup.notes, f"metadata {key} not read: {exc}"))
            continue
        checked[i] = check_against_metadata(backup, parse_metadata(raw))
    return dataclasses.replace(listing, backups=tuple(checked))


def select_backup(listing: BackupListing, backup_id: str | None = None) -> Backup:
    """The backup to restore: `backup_id` if given, else the latest; checked complete."""
    where = listing.location or "the store"
    if not listing.backups:
        if listing.store_empty:
            raise BackupNotFound(
                f"{where} is empty: no backups at all (check the bucket/container name, "
                "the prefix and the credentials' account)"
            )
        hint = ""
        if listing.other_guids:
            shown = ", ".join(listing.other_guids[:5])
            hint = f"; backups exist there for other GUIDs: {shown}"
        raise BackupNotFound(
            f"no backups for backup GUID {listing.guid} in {where}{hint} "
            "(check spec.source.backupGuid)"
        )
    if backup_id:
        wanted = parse_backup_id(backup_id, guid=listing.guid).value
        backup = listing.get(wanted)
        if backup is None:
            newest = ", ".join(b.backup_id for b in listing.backups[-3:])
            raise BackupNotFound(
                f"backup {wanted} not found in {where}; the newest available are: {newest} "
                "(check spec.source.backupId)"
            )
    else:
        backup = listing.backups[-1]
    if backup.problems:
        advice = ""
        if not backup_id:
            complete = [b for b in listing.backups if b.complete]
            if complete:
                advice = (
                    f"; the newest backup with all parts present is {complete[-1].backup_id} "
                    "(not yet decrypted: set spec.source.backupId to try it)"
                )
        raise BackupIncomplete(
            f"backup {backup.backup_id} in {where}: {'; '.join(backup.problems)}{advice}"
        )
    return backup
