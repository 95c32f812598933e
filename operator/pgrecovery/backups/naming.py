"""Names of a9s-pg logical backups: parse ids and object keys, order parts naturally.

Why this module exists: everything about which objects form which backup is decided from
their names, and the names are easy to get wrong. A backup id is `<guid>-<timestamp>` where
the GUID itself contains hyphens, so ids are parsed from the right. S3 holds the parts
`<id>-<index>` and the metadata `<id>.json`; Azure holds a single blob `<id>`. Parts must be
concatenated in natural order (`ls -1v`: `-2` before `-10`), never in key order.

Pure functions only: no I/O, so every rule here is unit-tested against literal names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from pgrecovery.errors import InvalidSpec

# A backup GUID is a UUID in every example we know of, but the Backup Manager's format is not
# documented: accept the characters a UUID-like token can have, nothing that could change the
# meaning of a key prefix or a path (no "/", "*", "?", whitespace).
_GUID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
# Timestamps are epoch milliseconds (13 digits). The runbook's own example shows 10 digits,
# so 10-13 digits are accepted; see `BackupId.taken_at`.
_TS = r"(?P<ts>\d{10,13})"
_ID_RE = re.compile(rf"^(?P<guid>.+)-{_TS}$")
_KEY_TAIL_RE = re.compile(rf"^{_TS}(?:-(?P<index>\d{{1,6}})|(?P<json>\.json))?$")
# Seconds since the epoch stay below this until the year 5138; milliseconds passed it in 1973.
_MS_THRESHOLD = 10**11

KeyKind = Literal["part", "metadata", "blob"]


def validate_guid(guid: str, *, field: str = "spec.source.backupGuid") -> str:
    """Return `guid` if it is a plausible backup GUID, else raise `InvalidSpec`."""
    if not _GUID_RE.match(guid):
        raise InvalidSpec(
            f"{guid!r} is not a backup GUID (letters, digits, '-' and '_' only, "
            "e.g. de2fe9e4-6535-423d-8709-dca87df7985c)",
            field=field,
        )
    return guid


@dataclass(frozen=True, order=True)
class BackupId:
    """`<guid>-<timestamp>`; orders by time, then by GUID."""

    timestamp_ms: int
    guid: str
    timestamp_text: str
    """The digits exactly as in the key, so the key can be rebuilt even with odd widths."""

    @property
    def value(self) -> str:
        return f"{self.guid}-{self.timestamp_text}"

    def __str__(self) -> str:
        return self.value

    @property
    def taken_at(self) -> datetime:
        """When the backup was taken, in UTC."""
        return datetime.fromtimestamp(self.timestamp_ms / 1000, tz=UTC)

    @classmethod
    def from_parts(cls, guid: str, timestamp_text: str) -> BackupId:
        value = int(timestamp_text)
        # A 10-digit stamp (as in the runbook's example) is read as seconds so that the date
        # shown to a person is plausible and ordering compares like with like.
        ms = value if value >= _MS_THRESHOLD else value * 1000
        return cls(timestamp_ms=ms, guid=guid, timestamp_text=timestamp_text)


def parse_backup_id(
    text: str, *, guid: str | None = None, field: str = "spec.source.backupId"
) -> BackupId:
    """Parse `<guid>-<timestamp>` from the right; check it belongs to `guid` when given."""
    text = text.strip()
    match = _ID_RE.match(text)
    if not match:
        raise InvalidSpec(
            f"{text!r} is not a backup id of the form <backup-guid>-<epoch-milliseconds>",
            field=field,
        )
    parsed_guid = validate_guid(match["guid"], field=field)
    if guid is not None and parsed_guid != guid:
        raise InvalidSpec(
            f"backup id {text!r} does not belong to backup GUID {guid!r}", field=field
        )
    return BackupId.from_parts(parsed_guid, match["ts"])


@dataclass(frozen=True)
class ParsedKey:
    """What one object name means for a given GUID."""

    backup_id: BackupId
    kind: KeyKind
    index: int | None = None


def parse_key(name: str, guid: str) -> ParsedKey | str:
    """Classify an object name (prefix already removed) for `guid`.

    Returns a `ParsedKey`, or a short reason why the name is not part of a backup of this
    GUID; callers report such names instead of failing on them.
    """
    head = f"{guid}-"
    if not name.startswith(head):
        return f"does not start with {head!r}"
    match = _KEY_TAIL_RE.match(name[len(head) :])
    if not match:
        return "not of the form <guid>-<epoch-ms>, <guid>-<epoch-ms>-<n> or <guid>-<epoch-ms>.json"
    backup_id = BackupId.from_parts(guid, match["ts"])
    if match["json"]:
        return ParsedKey(backup_id, "metadata")
    if match["index"] is not None:
        return ParsedKey(backup_id, "part", int(match["index"]))
    return ParsedKey(backup_id, "blob")


def guess_guid(name: str) -> str | None:
    """The GUID of a backup object name without knowing the GUID (for hints and local dirs).

    Takes the shortest GUID that leaves a valid `-<ms>[-<n>|.json]` tail; only a GUID whose
    last group is 10-13 digits *and* a name without index could be split wrongly, which is
    why listings for a known GUID use `parse_key` instead.
    """
    match = re.match(rf"^(?P<guid>.+?)-{_TS}(?:-\d{{1,6}}|\.json)?$", name)
    if match and _GUID_RE.match(match["guid"]):
        return match["guid"]
    return None


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key like GNU `ls -v`: digit runs compare as numbers (`-2` before `-10`)."""
    return tuple(
        (0, int(piece)) if piece.isdigit() else (1, piece)
        for piece in re.split(r"(\d+)", name)
        if piece
    )
