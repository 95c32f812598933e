"""WAL-E archive reading: lzop decoder against the real `lzop`, layout, history files, listing,
recovery window, base-backup choice, timelines and WAL continuity (backups/wale/).

The lzop files are made by the Debian `lzop` binary (the format WAL-E writes); corruption is
put into real files at known places. Listing runs over an in-memory ObjectStore fake holding a
small archive laid out like WAL-E's (keys with slashes, as in S3).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import struct
import subprocess
import tarfile
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from pgrecovery.adapters.objectstore import ObjectInfo
from pgrecovery.backups.wale import lzop
from pgrecovery.backups.wale.archive import Archive, BaseBackup, list_archive, load_details
from pgrecovery.backups.wale.history import (
    parse_backup_history,
    parse_timeline_history,
    sysid_from_tar,
)
from pgrecovery.backups.wale.layout import (
    WAL_SEGMENT_SIZE,
    BaseBackupName,
    Segment,
    classify_basebackup_key,
    classify_wal_key,
    default_prefix,
    normalise_prefix,
)
from pgrecovery.backups.wale.planning import (
    RecoveryWindow,
    TargetOutsideWindow,
    check_backup_on_path,
    choose_backup,
    last_segment,
    recovery_window,
    required_segments,
    segment_for,
    timeline_path,
)
from pgrecovery.errors import BackupCorrupt, BackupIncomplete, BackupNotFound, InvalidSpec
from tests.memory_store import MemoryStore

# ---------------------------------------------------------------- lzop


def _lzop(data: bytes, tmp: Path, *args: str) -> bytes:
    src = tmp / "in.bin"
    src.write_bytes(data)
    out = subprocess.run(["lzop", "-c", *args, str(src)], capture_output=True, check=True)
    return out.stdout


def _sample(size: int) -> bytes:
    # Compressible text with random runs: several 256 KiB blocks, some stored uncompressed.
    rnd = os.urandom(size // 4)
    return (b"WAL-E partition line\n" * (size // 42)) + rnd + bytes(size // 8)


@pytest.mark.parametrize(
    "flags",
    [(), ("-9",), ("-1", "--crc32"), ("--no-checksum",), ("-3",)],
    ids=["default-adler32", "lzo1x-999", "crc32", "no-checksum", "level3"],
)
def test_lzop_decoder_equals_the_lzop_binary(tmp_path: Path, flags: tuple[str, ...]) -> None:
    data = _sample(900_000)
    packed = _lzop(data, tmp_path, *flags)
    chunks = [packed[i:i + 777] for i in range(0, len(packed), 777)]  # odd chunk sizes
    assert b"".join(lzop.decode(chunks, "obj")) == data
    (tmp_path / "x.lzo").write_bytes(packed)
    assert b"".join(lzop.decode_file(tmp_path / "x.lzo", "obj")) == data


def test_lzop_empty_file(tmp_path: Path) -> None:
    assert lzop.decompress_bytes(_lzop(b"", tmp_path), "empty") == b""


def _first_block_data_offset(packed: bytes) -> int:
    """Offset of the first block's compressed bytes in a default lzop file (no name)."""
    reader = lzop._Reader([packed], "x")
    header = lzop._parse_header(reader, "x")
    checks = bin(header.flags & (lzop.F_ADLER32_D | lzop.F_CRC32_D)).count("1")
    checks += bin(header.flags & (lzop.F_ADLER32_C | lzop.F_CRC32_C)).count("1")
    return reader.offset + 8 + 4 * checks


def test_a_corrupt_compressed_block_fails_naming_the_object_and_block(tmp_path: Path) -> None:
    packed = bytearray(_lzop(b"WAL-E partition line\n" * 40_000, tmp_path))
    packed[_first_block_data_offset(bytes(packed)) + 100] ^= 0x5A
    # lzop's default writes the Adler-32 of the uncompressed bytes only: the damage shows as
    # undecodable LZO data or as that checksum failing, for block 0 either way.
    with pytest.raises(BackupCorrupt, match=r"^wal_005/X\.lzo: lzop block 0 (does not "
                                            r"decompress|fails its uncompressed checksum)"):
        b"".join(lzop.decode([bytes(packed)], "wal_005/X.lzo"))


def test_a_corrupt_stored_block_fails_its_checksum(tmp_path: Path) -> None:
    # Random bytes do not compress: lzop stores the blocks as they are, and a flipped byte
    # decodes "fine"; only the block checksum can catch it.
    data = random.Random(5).randbytes(300_000)
    for flags, kind in (((), "Adler-32"), (("--crc32",), "CRC-32")):
        packed = bytearray(_lzop(data, tmp_path, *flags))
        packed[_first_block_data_offset(bytes(packed)) + 1000] ^= 0x01
        with pytest.raises(BackupCorrupt, match=f"part_00000000.tar.lzo: lzop block 0 fails "
                                                f"its uncompressed checksum \\({kind}"):
            b"".join(lzop.decode([bytes(packed)], "part_00000000.tar.lzo"))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: b"GZIP" + p[4:], "bad magic"),
        (lambda p: p[:20] + bytes([p[20] ^ 0xFF]) + p[21:], "header checksum"),
        (lambda p: p[: len(p) // 2], "truncated"),
        (lambda p: p + b"junk", "after the end"),
        (lambda p: p[:-4], "truncated"),
    ],
    ids=["magic", "header", "half", "trailing", "no-end-marker"],
)
def test_damaged_lzop_files_fail_clearly(tmp_path: Path, mutate: object, message: str) -> None:
    packed = _lzop(_sample(400_000), tmp_path)
    with pytest.raises(BackupCorrupt, match=message) as caught:
        b"".join(lzop.decode([mutate(packed)], "the/object.lzo"))  # type: ignore[operator]
    assert "the/object.lzo" in str(caught.value)


def test_decoded_reader_reads_in_any_sizes(tmp_path: Path) -> None:
    data = _sample(500_000)
    reader = lzop.DecodedReader(lzop.decode([_lzop(data, tmp_path)], "x"))
    got = reader.read(10) + reader.read(300_000) + reader.read()
    assert got == data
    assert reader.bytes_out == len(data)
    assert reader.read(5) == b""


# ---------------------------------------------------------------- layout


def test_segment_names_round_trip_and_cross_the_4gib_boundary() -> None:
    seg = Segment.parse("0000000300000001000000FF")
    assert (seg.tli, seg.segno) == (3, 256 + 255)
    assert Segment(3, seg.segno + 1).name == "000000030000000200000000"
    assert seg.start_lsn == seg.segno * WAL_SEGMENT_SIZE
    with pytest.raises(ValueError, match="not a WAL file name"):
        Segment.parse("00000001000000000000010")
    with pytest.raises(ValueError, match="16 MiB"):
        Segment.parse("000000010000000000000100")


def test_base_backup_names_use_wal_e_offsets() -> None:
    b = BaseBackupName.parse("base_000000010000000000000002_00000040")
    assert b.start_lsn == 2 * WAL_SEGMENT_SIZE + 40
    assert b.history_file == "000000010000000000000002.00000028.backup"
    # pg_walfile_name_offset names the previous segment for an LSN on a boundary.
    edge = BaseBackupName.parse("base_000000010000000000000004_00000000")
    assert edge.start_lsn == 5 * WAL_SEGMENT_SIZE
    assert edge.first_segno == 5
    with pytest.raises(ValueError, match="not a base backup name"):
        BaseBackupName.parse("base_0000000100000000000002_00000040")


def test_key_classification() -> None:
    assert classify_basebackup_key(
        "base_000000010000000000000002_00000040_backup_stop_sentinel.json"
    ) == ("sentinel", "base_000000010000000000000002_00000040", None)
    assert classify_basebackup_key(
        "base_000000010000000000000002_00000040/tar_partitions/part_00000003.tar.lzo"
    ) == ("part", "base_000000010000000000000002_00000040", 3)
    assert classify_basebackup_key(
        "base_000000010000000000000002_00000040/extended_version.txt"
    ) == ("other", "base_000000010000000000000002_00000040", None)
    assert classify_basebackup_key("notes.txt") is None
    assert classify_wal_key("000000010000000000000002.lzo") == (
        "segment", "000000010000000000000002")
    assert classify_wal_key("00000002.history.lzo") == ("history", "00000002.history")
    assert classify_wal_key("000000010000000000000002.00000028.backup.lzo") == (
        "backup", "000000010000000000000002.00000028.backup")
    assert classify_wal_key("000000010000000000000002.partial.lzo")[0] == "partial"  # type: ignore[index]
    assert classify_wal_key("000000010000000000000002") is None


def test_prefixes() -> None:
    guid = "de2fe9e4-6535-423d-8709-dca87df7985c"
    assert default_prefix(guid) == f"backups/{guid}/wal/"
    assert normalise_prefix("/x/y") == "x/y/"
    with pytest.raises(InvalidSpec, match=r"spec\.source\.s3\.prefix"):
        normalise_prefix("x/../y")


# ---------------------------------------------------------------- history files

HISTORY = """START WAL LOCATION: 0/2000028 (file 000000010000000000000002)
STOP WAL LOCATION: 0/2000100 (file 000000010000000000000002)
CHECKPOINT LOCATION: 0/2000060
BACKUP METHOD: streamed
BACKUP FROM: primary
START TIME: 2026-11-21 10:00:00 {zone}
LABEL: pg_basebackup base backup
START TIMELINE: 1
STOP TIME: 2026-11-21 10:00:07 {zone}
STOP TIMELINE: 1
"""


def test_backup_history_parsing_and_zones() -> None:
    h = parse_backup_history(HISTORY.format(zone="UTC"), "x.backup")
    assert (h.start_lsn, h.stop_lsn, h.start_tli) == (0x2000028, 0x2000100, 1)
    assert h.stop_time == datetime(2026, 11, 21, 10, 0, 7, tzinfo=UTC)
    cet = parse_backup_history(HISTORY.format(zone="Europe/Berlin"), "x")
    assert cet.stop_time.astimezone(UTC) == datetime(2026, 11, 21, 9, 0, 7, tzinfo=UTC)
    plus = parse_backup_history(HISTORY.format(zone="+0530"), "x")
    assert plus.stop_time.utcoffset() == timedelta(hours=5, minutes=30)
    with pytest.raises(BackupCorrupt, match="time zone 'XYZT'"):
        parse_backup_history(HISTORY.format(zone="XYZT"), "x")
    with pytest.raises(BackupCorrupt, match="lacks STOP TIME"):
        parse_backup_history(HISTORY.format(zone="UTC").replace("STOP TIME", "NOPE"), "x")


def test_timeline_history_parsing() -> None:
    text = "1\t0/5000060\tno recovery target specified\n\n2\t0/7000000\tat restore point\n"
    entries = parse_timeline_history(text, "00000003.history")
    assert [(e.parent, e.switch_lsn) for e in entries] == [(1, 0x5000060), (2, 0x7000000)]
    with pytest.raises(BackupCorrupt, match=r"00000003\.history"):
        parse_timeline_history("1 zz", "00000003.history")


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_sysid_from_pg_control_in_a_tar_stream() -> None:
    control = struct.pack("<Q", 7310000000000000042) + bytes(8184)
    tar = _tar({"PG_VERSION": b"15\n", "global/pg_control": control, "base/1/1259": b"x"})
    assert sysid_from_tar(io.BytesIO(tar), "p0") == 7310000000000000042
    assert sysid_from_tar(io.BytesIO(_tar({"base/1/1": b"y"})), "p1") is None
    with pytest.raises(BackupCorrupt, match="p2: not a readable tar"):
        sysid_from_tar(io.BytesIO(b"\x01" * 1024), "p2")


# ---------------------------------------------------------------- listing (LocalDirStore)

PREFIX = "backups/de2fe9e4-6535-423d-8709-dca87df7985c/wal/"
SYSID = 7310000000000000042


def _put(root: MemoryStore, rel: str, data: bytes) -> None:
    root.objects[PREFIX + rel] = data


def _make_archive(root: MemoryStore, tmp: Path, *, sysid: int = SYSID) -> None:
    """Two base backups on timeline 1, a switch to timeline 2, segments 2..9."""
    control = struct.pack("<Q", sysid) + bytes(8184)
    for start, stop_time in ((2, "10:00:07"), (5, "11:00:03")):
        name = f"base_0000000100000000000000{start:02X}_00000040"
        part = _lzop(_tar({"PG_VERSION": b"15\n", "backup_label": b"x",
                           "global/pg_control": control}), tmp)
        _put(root, f"basebackups_005/{name}/tar_partitions/part_00000000.tar.lzo", part)
        _put(root, f"basebackups_005/{name}/extended_version.txt", b"PostgreSQL 15")
        _put(root, f"basebackups_005/{name}_backup_stop_sentinel.json", json.dumps(
            {"wal_segment_backup_stop": name[5:29], "wal_segment_offset_backup_stop": "256",
             "expanded_size_bytes": 10240}).encode())
        hist = HISTORY.format(zone="UTC").replace("0/2000", f"0/{start}000").replace(
            "10:00:07", stop_time).replace("10:00:00", stop_time[:-2] + "00")
        _put(root, f"wal_005/0000000100000000000000{start:02X}.00000028.backup.lzo",
             _lzop(hist.encode(), tmp))
    for segno in range(2, 8):
        _put(root, f"wal_005/{Segment(1, segno).name}.lzo", b"seg")
    for segno in range(7, 10):
        _put(root, f"wal_005/{Segment(2, segno).name}.lzo", b"seg")
    _put(root, "wal_005/00000002.history.lzo", _lzop(b"1\t0/7000100\tpromoted\n", tmp))
    _put(root, "sysids/sysid", f"{sysid}\n".encode())
    _put(root, "stray.txt", b"?")
    _put(root, "basebackups_005/base_000000010000000000000009_00000040/tar_partitions/"
               "part_00000000.tar.lzo", b"in progress, no sentinel")


def _load(root: MemoryStore) -> Archive:
    async def run() -> Archive:
        archive = await list_archive(root, PREFIX)
        await load_details(root, archive)
        return archive

    return asyncio.run(run())


def test_listing_reads_backups_segments_histories_and_sysid(tmp_path: Path) -> None:
    root = MemoryStore()
    _make_archive(root, tmp_path)
    archive = _load(root)
    assert [b.name.name for b in archive.complete_backups] == [
        "base_000000010000000000000002_00000040", "base_000000010000000000000005_00000040"]
    assert "base_000000010000000000000009_00000040" in archive.backups  # no sentinel: not used
    assert archive.sysid == SYSID
    assert len(archive.segments) == 9
    assert archive.timeline_history[2][0].switch_lsn == 0x7000100
    assert archive.complete_backups[1].history is not None
    assert archive.complete_backups[1].history.stop_time == datetime(2026, 11, 21, 11, 0, 3,
                                                                     tzinfo=UTC)
    assert archive.complete_backups[0].expanded_size == 10240
    assert [k.rsplit("/", 1)[-1] for k in archive.ignored] == ["stray.txt"]


def test_empty_prefix_and_no_complete_backup(tmp_path: Path) -> None:
    root = MemoryStore()
    with pytest.raises(BackupNotFound, match="prefix is empty"):
        _load(root)
    _put(root, "wal_005/000000010000000000000002.lzo", b"x")
    with pytest.raises(BackupNotFound, match="no complete base backup"):
        _load(root)


def test_a_gap_in_partition_numbers_is_incomplete(tmp_path: Path) -> None:
    root = MemoryStore()
    _make_archive(root, tmp_path)
    _put(root, "basebackups_005/base_000000010000000000000002_00000040/tar_partitions/"
               "part_00000002.tar.lzo", b"x")
    with pytest.raises(BackupIncomplete, match=r"part_00000001\.tar\.lzo"):
        _load(root)


def test_a_sysid_that_is_not_a_number_is_corrupt(tmp_path: Path) -> None:
    root = MemoryStore()
    _make_archive(root, tmp_path)
    _put(root, "sysids/sysid", b"hello")
    with pytest.raises(BackupCorrupt, match="not a system identifier"):
        _load(root)


# ---------------------------------------------------------------- planning


def _planned(tmp_path: Path) -> tuple[Archive, RecoveryWindow]:
    root = MemoryStore()
    _make_archive(root, tmp_path)
    archive = _load(root)
    path = timeline_path(archive)
    last = last_segment(archive, path)
    assert last is not None
    end = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
    return archive, recovery_window(archive, end, last)


def test_timeline_path_and_segment_choice_across_a_switch(tmp_path: Path) -> None:
    archive, window = _planned(tmp_path)
    path = timeline_path(archive)
    assert [(e.tli, e.begin_lsn, e.end_lsn) for e in path] == [(1, 0, 0x7000100),
                                                                (2, 0x7000100, None)]
    assert segment_for(path, 6) == Segment(1, 6)
    assert segment_for(path, 7) == Segment(2, 7)  # the switch segment comes from the new tli
    assert window.last_segment == "000000020000000000000009"
    assert window.start == datetime(2026, 11, 21, 10, 0, 8, tzinfo=UTC)
    assert "base_000000010000000000000002_00000040" in window.describe()


def test_choice_by_target(tmp_path: Path) -> None:
    archive, window = _planned(tmp_path)
    latest = choose_backup(archive, window, None, best_effort=False)
    assert latest.backup.name.name.endswith("05_00000040")
    assert latest.target_time is None
    t = datetime(2026, 11, 21, 10, 30, tzinfo=UTC)
    early = choose_backup(archive, window, t, best_effort=False)
    assert early.backup.name.name.endswith("02_00000040")
    assert early.target_time == t
    # exactly at the second backup's stop second: not yet safe (+1 s rule)
    edge = choose_backup(archive, window, datetime(2026, 11, 21, 11, 0, 3, tzinfo=UTC), False)
    assert edge.backup.name.name.endswith("02_00000040")
    in_zone = datetime(2026, 11, 21, 13, 0, 5, tzinfo=timezone(timedelta(hours=2)))
    assert choose_backup(archive, window, in_zone, False).backup.name.name.endswith("05_00000040")


def test_targets_outside_the_window(tmp_path: Path) -> None:
    archive, window = _planned(tmp_path)
    beyond = datetime(2026, 11, 21, 12, 0, 1, tzinfo=UTC)
    with pytest.raises(TargetOutsideWindow, match="beyond the archive; recoverable window: "
                                                  "2026-11-21T10:00:08"):
        choose_backup(archive, window, beyond, best_effort=False)
    best = choose_backup(archive, window, beyond, best_effort=True)
    assert best.target_time is None
    assert "beyond the archive" in best.note
    with pytest.raises(TargetOutsideWindow, match="before the first consistent point"):
        choose_backup(archive, window, datetime(2026, 11, 21, 10, 0, 7, tzinfo=UTC), True)


def test_continuity_names_the_first_missing_segment(tmp_path: Path) -> None:
    archive, _window = _planned(tmp_path)
    path = timeline_path(archive)
    segs = required_segments(archive, path, 2, 9, "test")
    assert [s.name for s in segs][-3:] == ["000000020000000000000007",
                                           "000000020000000000000008",
                                           "000000020000000000000009"]
    del archive.segments["000000010000000000000004"]
    with pytest.raises(BackupIncomplete, match="000000010000000000000004 is missing"):
        required_segments(archive, path, 2, 9, "test")
    del archive.segments["000000020000000000000007"]
    with pytest.raises(BackupIncomplete, match="000000020000000000000007 is missing"):
        required_segments(archive, path, 5, 9, "test")


def test_a_backup_on_an_abandoned_branch_is_refused(tmp_path: Path) -> None:
    archive, _window = _planned(tmp_path)
    path = timeline_path(archive)
    check_backup_on_path(archive.complete_backups[1], path, archive)
    after_switch = BaseBackup(BaseBackupName.parse("base_000000010000000000000008_00000040"))
    with pytest.raises(BackupNotFound, match="not an ancestor of the newest timeline 2"):
        check_backup_on_path(after_switch, path, archive)


def test_a_missing_timeline_history_is_incomplete(tmp_path: Path) -> None:
    root = MemoryStore()
    _make_archive(root, tmp_path)
    _put(root, "wal_005/00000003.history.lzo", _lzop(b"1\t0/7000100\tx\n", tmp_path))
    archive = _load(root)
    archive.timeline_history.pop(3)
    archive.segments[Segment(3, 9).name] = ObjectInfo("k", 1)
    with pytest.raises(BackupIncomplete, match=r"00000003\.history\.lzo"):
        timeline_path(archive)
