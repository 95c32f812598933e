"""Backup ids, object keys and natural order (pgrecovery.backups.naming, .listing)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from pgrecovery.adapters.objectstore import ObjectInfo
from pgrecovery.backups.listing import (
    BackupListing,
    BackupMetadata,
    build_listing,
    check_against_metadata,
    parse_metadata,
    select_backup,
)
from pgrecovery.backups.naming import (
    BackupId,
    ParsedKey,
    guess_guid,
    natural_key,
    parse_backup_id,
    parse_key,
    validate_guid,
)
from pgrecovery.errors import BackupIncomplete, BackupNotFound, InvalidSpec

pytestmark = pytest.mark.unit

G = "de2fe9e4-6535-423d-8709-dca87df7985c"


def test_backup_id_is_parsed_from_the_right() -> None:
    bid = parse_backup_id(f"{G}-1548967947154")
    assert bid.guid == G
    assert bid.timestamp_ms == 1548967947154
    assert bid.value == f"{G}-1548967947154"
    assert bid.taken_at == datetime(2019, 1, 31, 20, 52, 27, 154000, tzinfo=UTC)


def test_ten_digit_runbook_example_is_read_as_seconds() -> None:
    bid = parse_backup_id(f"{G}-1740130000")
    assert bid.taken_at.year == 2025
    assert bid.value == f"{G}-1740130000"


@pytest.mark.parametrize("bad", ["", G, f"{G}-12", f"{G}-abc", f"x/y-{1548967947154}"])
def test_bad_backup_ids_name_the_field(bad: str) -> None:
    with pytest.raises(InvalidSpec, match=r"spec\.source\.backupId"):
        parse_backup_id(bad)


def test_backup_id_of_another_guid_is_refused() -> None:
    with pytest.raises(InvalidSpec, match="does not belong to backup GUID"):
        parse_backup_id(f"{G}-1548967947154", guid="aaaa-bbbb")


@pytest.mark.parametrize("bad", ["", "a b", "../x", "a*", "x/y"])
def test_validate_guid_refuses_path_and_glob_characters(bad: str) -> None:
    with pytest.raises(InvalidSpec, match="not a backup GUID"):
        validate_guid(bad)


def test_parse_key_kinds() -> None:
    assert parse_key(f"{G}-1548967947154-10", G) == ParsedKey(
        BackupId.from_parts(G, "1548967947154"), "part", 10
    )
    assert parse_key(f"{G}-1548967947154.json", G).kind == "metadata"  # type: ignore[union-attr]
    assert parse_key(f"{G}-1548967947154", G).kind == "blob"  # type: ignore[union-attr]
    assert isinstance(parse_key(f"{G}-notes.txt", G), str)
    assert isinstance(parse_key(f"{G}-1548967947154-1-2", G), str)
    assert isinstance(parse_key("other-1548967947154-1", G), str)


def test_guid_whose_last_group_is_digits() -> None:
    guid = "de2fe9e4-6535-423d-8709-123456789012"
    parsed = parse_key(f"{guid}-1548967947154-3", guid)
    assert isinstance(parsed, ParsedKey)
    assert parsed.index == 3
    assert guess_guid(f"{guid}-1548967947154-3") == guid
    assert guess_guid(f"{guid}-1548967947154.json") == guid
    assert guess_guid(f"{G}-1548967947154") == G
    assert guess_guid("random.txt") is None


def test_natural_order_is_ls_v_order() -> None:
    names = [f"{G}-1-{i}" for i in (10, 2, 0, 1, 11, 9)]
    assert sorted(names, key=natural_key) == [f"{G}-1-{i}" for i in (0, 1, 2, 9, 10, 11)]
    # Plain string order would put -10 before -2: the bug the runbook's `ls -1v` avoids.
    assert sorted(names)[2] == f"{G}-1-10"


def _objs(*specs: tuple[str, int]) -> list[ObjectInfo]:
    return [ObjectInfo(key, size, f"etag-{key}") for key, size in specs]


def _parts(
    ts: int, indexes: list[int], *, size: int = 1024, last: int = 1024 + 16
) -> list[ObjectInfo]:
    keys = [(f"{G}-{ts}-{i}", size if i != indexes[-1] else last) for i in indexes]
    return _objs(*keys)


def test_listing_groups_orders_and_reports() -> None:
    objects = [
        *_parts(1700000000000, [0, 1, 2]),
        *_parts(1700000100000, list(range(13))),
        *_objs((f"{G}-1700000100000.json", 200), (f"{G}-junk", 5), (f"{G}-17.tmp", 1)),
    ]
    listing = build_listing(G, objects, location="s3://b")
    assert [b.backup_id for b in listing.backups] == [f"{G}-1700000000000", f"{G}-1700000100000"]
    latest = listing.latest
    assert latest is not None
    assert latest.part_count == 13
    assert [p.index for p in latest.parts] == list(range(13))
    assert latest.total_size == 12 * 1024 + 1040
    assert latest.has_metadata
    assert not listing.backups[0].has_metadata
    assert latest.complete
    assert {i.key for i in listing.ignored} == {f"{G}-junk", f"{G}-17.tmp"}
    assert select_backup(listing) is latest
    assert select_backup(listing, f"{G}-1700000000000") is listing.backups[0]


def test_part_numbering_may_start_at_one() -> None:
    listing = build_listing(G, _parts(1700000000000, [1, 2, 3]))
    assert listing.backups[0].complete


def test_missing_middle_part_is_found_at_listing() -> None:
    listing = build_listing(G, _parts(1700000000000, [0, 1, 2, 4, 5]), location="s3://b")
    backup = listing.backups[0]
    assert not backup.complete
    with pytest.raises(BackupIncomplete, match=r"part\(s\) 3 missing: found parts 0-2, 4-5"):
        select_backup(listing)


def test_missing_first_parts_are_found() -> None:
    listing = build_listing(G, _parts(1700000000000, [2, 3]))
    with pytest.raises(BackupIncomplete, match="the first part is missing"):
        select_backup(listing)


def test_truncated_last_part_is_found_from_sizes() -> None:
    listing = build_listing(G, _parts(1700000000000, [0, 1], last=1000))
    with pytest.raises(BackupIncomplete, match=r"not 16 \+ a multiple of 16 bytes.*truncated"):
        select_backup(listing)


def test_incomplete_latest_points_to_newest_complete() -> None:
    objects = [*_parts(1700000000000, [0, 1]), *_parts(1700000100000, [0, 2])]
    with pytest.raises(
        BackupIncomplete,
        match=f"newest backup with all parts present is {G}-1700000000000 \\(not yet decrypted",
    ):
        select_backup(build_listing(G, objects))


def test_metadata_names_missing_trailing_parts_instead_of_a_truncated_one() -> None:
    # Two of four parts present; the sizes alone say "the last part is truncated".
    backup = build_listing(G, _parts(1700000000000, [0, 1], last=1000)).backups[0]
    assert any("truncated" in p for p in backup.problems)
    checked = check_against_metadata(backup, parse_metadata(b'{"parts": 4, "size": 123}'))
    assert not any("truncated" in p for p in checked.problems), checked.problems
    assert checked.problems[-1].startswith(
        f"the last 2 part(s) missing: {G}-1700000000000.json lists 4 parts, found 2 (missing: "
        f"{G}-1700000000000-2, {G}-1700000000000-3)"), checked.problems


def test_metadata_size_mismatch_and_what_is_not_understood() -> None:
    backup = build_listing(G, _parts(1700000000000, [0, 1])).backups[0]
    total = backup.total_size
    assert check_against_metadata(backup, parse_metadata(
        f'{{"parts": 2, "size": {total}}}'.encode())).problems == ()
    wrong = check_against_metadata(backup, parse_metadata(b'{"size": 7}'))
    assert "says 7" in wrong.problems[0]
    for raw in (b"not json", b"[1, 2]", b'{"parts": true, "size": "big"}', b"{}"):
        assert parse_metadata(raw) == BackupMetadata(), raw
        assert check_against_metadata(backup, parse_metadata(raw)) == backup
    assert parse_metadata(b'{"files": ["a-0", "a-1", "a-2"]}').parts is None
    assert parse_metadata(b'{"parts": ["a-0", "a-1", "a-2"]}').parts == 3


def test_metadata_only_backup_is_incomplete() -> None:
    listing = build_listing(G, _objs((f"{G}-1700000000000.json", 10)))
    with pytest.raises(BackupIncomplete, match="only metadata"):
        select_backup(listing)


def test_azure_single_blob_backup() -> None:
    listing = build_listing(G, _objs((f"{G}-1700000000000", 4096 + 16)))
    backup = select_backup(listing)
    assert backup.part_count == 1
    assert backup.parts[0].index is None


def test_prefix_is_stripped() -> None:
    listing = build_listing(G, [ObjectInfo(f"a9s/{G}-1700000000000-0", 48)], prefix="a9s/")
    assert listing.backups[0].parts[0].name == f"{G}-1700000000000-0"
    assert listing.backups[0].parts[0].key == f"a9s/{G}-1700000000000-0"


def test_unknown_backup_id() -> None:
    listing = build_listing(G, _parts(1700000000000, [0]), location="s3://b")
    with pytest.raises(BackupNotFound, match=f"backup {G}-1700000000001 not found in s3://b"):
        select_backup(listing, f"{G}-1700000000001")


def test_no_backups_messages() -> None:
    empty = BackupListing(G, "s3://b", (), store_empty=True)
    with pytest.raises(BackupNotFound, match="s3://b is empty"):
        select_backup(empty)
    other = BackupListing(G, "s3://b", (), other_guids=("abc",))
    with pytest.raises(BackupNotFound, match=f"no backups for backup GUID {G}.*other GUIDs: abc"):
        select_backup(other)
