"""Reading a real WAL-E archive from S3 (backups/wale/ over the real S3 adapter).

A scratch PostgreSQL 15 on this machine archives into moto's S3 the WAL-E way (H4's world:
archive_command with lzop, a base backup from pg_basebackup in WAL-E's layout). pgrecovery's
reader lists it, shows the window, chooses the base backup, downloads and verifies the WAL a
target needs, and reads pg_control's system identifier; the commit times it reads from the WAL
are compared with `pg_waldump`'s on the same segments.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from pydantic import SecretStr

from pgrecovery.backups.config import S3Credentials, S3Location
from pgrecovery.backups.stores import open_s3_store
from pgrecovery.backups.wale.archive import Archive, list_archive, load_details
from pgrecovery.backups.wale.fetch import (
    WalPlan,
    decode_segment,
    download,
    fetch_wal,
    local_name,
    verify_base_backup,
    window_end,
)
from pgrecovery.backups.wale.layout import Segment, segno_of
from pgrecovery.backups.wale.planning import (
    RecoveryWindow,
    choose_backup,
    last_segment,
    recovery_window,
    timeline_path,
)
from pgrecovery.backups.wale.walscan import WalScanner
from tests.objectstores.servers import S3Server
from tests.wale.archive import PG_BINDIR, ArchiveTarget, BaseBackup, make_base_backup
from tests.wale.faults import PitrPoint, commit_rows_around_time
from tests.wale.localpg import LocalPostgres

pytestmark = [pytest.mark.integration]

PORT = 54615  # this module's scratch server; other modules use other ports


@pytest.fixture
def local_archive(moto_s3: S3Server) -> Iterator[tuple[ArchiveTarget, LocalPostgres,
                                                       BaseBackup]]:
    target = ArchiveTarget.on(moto_s3, moto_s3.new_bucket("walread"))
    server = LocalPostgres(port=PORT)
    try:
        server.initdb()
        server.set_config(server.archive_settings(target))
        server.start()
        backup = make_base_backup(server, target)
        yield target, server, backup
    finally:
        server.remove()


async def _read(target: ArchiveTarget, point: PitrPoint | None, work: Path,
                best_effort: bool = False) -> tuple[Archive, RecoveryWindow, WalPlan, int | None]:
    store = await open_s3_store(
        S3Location(bucket=target.bucket, region=target.region, endpoint=target.endpoint_url),
        S3Credentials(access_key_id=target.access_key,
                      secret_access_key=SecretStr(target.secret_key)),
    )
    try:
        archive = await list_archive(store, target.prefix)
        await load_details(store, archive)
        path = timeline_path(archive)
        last = last_segment(archive, path)
        assert last is not None
        end = await window_end(store, archive, path, last, work, archive.sysid)
        window = recovery_window(archive, end, last)
        wanted = point.target_time if point else None
        choice = choose_backup(archive, window, wanted, best_effort)
        backup = choice.backup
        for part in backup.parts:
            await download(store, part, work)
        parts = [(work / local_name(p.key), p.key) for p in backup.parts]
        sysid, _size = await asyncio.to_thread(verify_base_backup, parts)
        assert backup.history is not None
        plan = await fetch_wal(store, archive, path, backup, target=choice.target_time,
                               last=last, stop_segno=segno_of(backup.history.stop_lsn),
                               work=work, sysid=sysid)
        return archive, window, plan, sysid
    finally:
        await store.close()


def _waldump_times(path: Path) -> list[datetime]:
    out = subprocess.run([f"{PG_BINDIR}/pg_waldump", str(path)], capture_output=True,
                         text=True, check=False).stdout
    found = re.findall(r"rmgr: Transaction .*desc: (?:COMMIT|ABORT) "
                       r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC", out)
    return [datetime.fromisoformat(t.replace(" ", "T")) for t in found]


@pytest.mark.slow
def test_real_archive_window_choice_wal_and_sysid(
    local_archive: tuple[ArchiveTarget, LocalPostgres, BaseBackup], tmp_path: Path
) -> None:
    target, server, backup = local_archive
    point = commit_rows_around_time(server, target, rows_a=300, rows_b=200)
    archive, window, plan, sysid = asyncio.run(_read(target, point, tmp_path))
    assert [b.name.name for b in archive.complete_backups] == [backup.name]
    assert archive.sysid == int(backup.sysid) == sysid
    assert window.start is not None
    assert window.end is not None
    assert window.start <= point.target_time < window.end
    assert plan.reached_target
    assert plan.segments[0] == Segment.parse(backup.start_segment)
    assert plan.segments[-1].name <= point.last_segment
    # The commit times our scanner reads equal pg_waldump's, segment by segment.
    scanner = WalScanner()
    compared = 0
    for seg in plan.segments:
        obj = archive.segments[seg.name]
        data = decode_segment(tmp_path / local_name(obj.key), obj.key)
        raw = tmp_path / seg.name
        raw.write_bytes(data)
        ours = scanner.scan(seg, data, seg.name).xact_times
        theirs = _waldump_times(raw)
        assert [t.replace(tzinfo=None) for t in ours] == [
            t.replace(tzinfo=None) for t in theirs], seg.name
        compared += len(theirs)
    assert compared >= 3  # table creation, rows A, rows B at least
    assert any(t > point.target_time for t in
               scanner.scan(plan.segments[-1], decode_segment(
                   tmp_path / local_name(archive.segments[plan.segments[-1].name].key), "x"),
                   "x").xact_times)


@pytest.mark.slow
def test_real_archive_to_the_end_when_the_target_lies_beyond(
    local_archive: tuple[ArchiveTarget, LocalPostgres, BaseBackup], tmp_path: Path
) -> None:
    target, server, _backup = local_archive
    point = commit_rows_around_time(server, target)
    beyond = PitrPoint(point.table, point.target_time + timedelta(days=1), 0, 0,
                       point.last_segment)
    archive, window, plan, _sysid = asyncio.run(_read(target, beyond, tmp_path,
                                                      best_effort=True))
    assert not plan.reached_target
    assert plan.segments[-1].name == window.last_segment
    assert window.end is not None
    assert window.end < beyond.target_time
    assert len(plan.segments) == len(set(plan.segments))
    assert archive.segments
