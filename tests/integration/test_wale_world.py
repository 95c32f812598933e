"""The WAL-E test world is real: archives written by PostgreSQL 15 of the simulated cluster in
WAL-E's layout, and they restore with plain PostgreSQL tools the way the manual runbook does
(extract the lzop'd tar partitions, restore_command with `lzop -dc`, recovery_target_time).

Also the archiver's contract (idempotent push, refusal to overwrite different content, SigV4
accepted by a signature-checking S3 server, secrets never on a command line) and the negative
tools (a corrupt lzop block fails lzop's checksum, a missing segment stops recovery short of
its target, a different sysid) that the physical-recovery tests build on.
"""

from __future__ import annotations

import json
import re
import subprocess
import tarfile
import uuid
from io import BytesIO
from pathlib import Path

import pytest

from tests.objectstores.servers import S3Server
from tests.wale.archive import (
    SYSTEM_PYTHON,
    WALCMD,
    ArchiveTarget,
    WaleWorldError,
    archive_window,
    make_base_backup,
    read_lzop_object,
    wale_keeps,
    write_envdir,
)
from tests.wale.faults import (
    commit_rows_around_time,
    corrupt_partition,
    corrupt_wal_segment,
    delete_middle_segment,
    other_sysid,
    write_sysid,
)
from tests.wale.layout import (
    Layout,
    parse_lsn,
    segment_number,
    walfile_containing,
    walfile_name_offset,
)
from tests.wale.localpg import LocalPostgres
from tests.wale.runbook import extract_base_backup, restore_to_time
from tests.wale.simarchive import VM_ENVDIR, WaleArchive
from tests.wale.walcmd import WAL_NAME_RE

pytestmark = [pytest.mark.integration, pytest.mark.vms]

BASE_RE = re.compile(r"^base_[0-9A-F]{24}_\d{8}$")


def test_archive_of_the_sim_cluster_has_wale_layout(wale_archive: WaleArchive) -> None:
    target, backup = wale_archive.target, wale_archive.base_backup
    layout = target.layout
    assert BASE_RE.match(backup.name)
    assert backup.name == f"base_{backup.start_segment}_{backup.start_offset:08d}"
    keys = set(target.list_keys())
    assert layout.extended_version(backup.name) in keys
    assert layout.partition(backup.name, 0) in keys
    assert layout.sentinel(backup.name) in keys
    client = target.client()

    def body(key: str) -> bytes:
        return bytes(client.get_object(Bucket=target.bucket, Key=key)["Body"].read())

    sentinel = json.loads(body(layout.sentinel(backup.name)))
    assert set(sentinel) == {
        "wal_segment_backup_stop",
        "wal_segment_offset_backup_stop",
        "expanded_size_bytes",
        "spec",
    }
    assert sentinel["wal_segment_offset_backup_stop"] == f"{backup.stop_offset:08d}"
    assert sentinel["spec"] == {"base_prefix": "/var/vcap/store/postgresql15/", "tablespaces": []}
    assert body(layout.extended_version(backup.name)).startswith(b"PostgreSQL 15.")
    primary = wale_archive.primary
    sysid = primary.psql("SELECT system_identifier FROM pg_control_system()")
    assert body(layout.sysid) == f"{sysid}\n".encode()

    # WAL objects are lzop files of whole segments; the .backup history file is there too.
    window = wale_archive.window()
    assert backup.start_segment in window.segments
    assert backup.stop_segment in window.segments
    backup_history = f"{backup.start_segment}.{backup.start_offset:08X}.backup"
    assert backup_history in window.history
    raw = body(layout.wal_object(backup.start_segment))
    assert raw[:9] == b"\x89LZO\x00\r\n\x1a\n"
    assert len(read_lzop_object(target, layout.wal_object(backup.start_segment))) == 16 * 2**20
    assert window.sysid == sysid

    # Tar members: what WAL-E keeps (backup_label, postgresql.auto.conf, pg_control), not what
    # it leaves out (config files, postmaster.pid, WAL).
    members = set(backup.members)
    assert {"backup_label", "postgresql.auto.conf", "global/pg_control", "PG_VERSION"} <= members
    assert not members & {"postgresql.conf", "pg_hba.conf", "pg_ident.conf", "postmaster.pid"}
    assert not [m for m in members if m.startswith("pg_wal/")]
    assert sentinel["expanded_size_bytes"] == backup.expanded_size_bytes > 0

    # Only the primary archives.
    assert primary.psql("SHOW archive_mode") == "on"
    for standby in wale_archive.cluster.standbys():
        assert standby.psql("SELECT archived_count FROM pg_stat_archiver") == "0"


# ---------------------------------------------------------------- the runbook works on it


def test_runbook_restore_to_target_time_has_rows_a_not_b(wale_archive: WaleArchive) -> None:
    """Plain tools only: partitions through `lzop -dc | tar -x`, restore_command with
    `lzop -dc`, recovery_target_time between the A and B commits."""
    target, backup = wale_archive.target, wale_archive.base_backup
    point = commit_rows_around_time(wale_archive.pg, target)
    result = restore_to_time(target, backup, point.recovery_target_time)
    try:
        server = result.server
        assert result.started, server.log_tail()
        table = point.table  # a checked identifier (faults.commit_rows_around_time)
        counts = server.psql(f"SELECT batch, count(*) FROM {table} GROUP BY 1 ORDER BY 1")  # noqa: S608
        assert counts == f"A|{point.rows_a}"
        assert server.psql("SELECT system_identifier FROM pg_control_system()") == backup.sysid
        # Promoted onto a new timeline: the target was reached, not the end of the archive.
        # (The backup's timeline is 1 on a fresh cluster, later after earlier PITR tests.)
        promoted = server.psql("SELECT timeline_id FROM pg_control_checkpoint()")
        assert promoted == str(backup.timeline + 1)
        assert "recovery stopping before commit" in server.log_path.read_text()
        # On the source, B is there: the restore stopped in time, not for want of WAL.
        on_source = f"SELECT count(*) FROM {table} WHERE batch = 'B'"  # noqa: S608
        assert wale_archive.primary.psql(on_source) == str(point.rows_b)
    finally:
        result.server.remove()


def test_missing_segment_in_the_middle_stops_recovery_short(wale_archive: WaleArchive) -> None:
    target, backup = wale_archive.target, wale_archive.base_backup
    pg = wale_archive.pg
    pg.psql("CREATE TABLE IF NOT EXISTS wale_filler (x int); INSERT INTO wale_filler VALUES (1)")
    wale_archive.switch_wal()
    pg.psql("INSERT INTO wale_filler VALUES (2)")
    wale_archive.switch_wal()
    point = commit_rows_around_time(pg, target)
    victim = delete_middle_segment(target, after=backup.stop_segment)
    window = archive_window(target)
    assert window.gaps(since=backup.start_segment) == [victim], window.segments
    result = restore_to_time(target, backup, point.recovery_target_time)
    try:
        assert not result.started
        assert not result.server.running
        log = result.server.log_path.read_text()
        assert "recovery ended before configured recovery target was reached" in log
    finally:
        result.server.remove()


def test_corrupt_lzop_block_fails_lzop_checksum(wale_archive: WaleArchive) -> None:
    target, backup = wale_archive.target, wale_archive.base_backup
    segment = backup.start_segment
    intact = target.layout.wal_object(backup.stop_segment)
    wal_key = corrupt_wal_segment(target, segment)
    part_key = corrupt_partition(target, backup.name, 0)
    client = target.client()
    for key in (wal_key, part_key):
        body = client.get_object(Bucket=target.bucket, Key=key)["Body"].read()
        test = subprocess.run(["lzop", "-t", "-"], input=body, capture_output=True, check=False)
        assert test.returncode != 0
        assert re.search(rb"(?i)checksum error|data violation", test.stderr), test.stderr
        with pytest.raises(WaleWorldError, match="lzop -d"):
            read_lzop_object(target, key)
    if intact != wal_key:
        body = client.get_object(Bucket=target.bucket, Key=intact)["Body"].read()
        assert subprocess.run(["lzop", "-t", "-"], input=body, check=False).returncode == 0
    # The runbook's extraction step refuses the damaged partition.
    server = LocalPostgres()
    try:
        with pytest.raises(WaleWorldError, match=r"extracting .*part_00000000"):
            extract_base_backup(target, backup, server)
    finally:
        server.remove()


def test_other_sysid_disagrees_with_the_base_backup(wale_archive: WaleArchive) -> None:
    target, backup = wale_archive.target, wale_archive.base_backup
    other = other_sysid(backup.sysid)
    assert other != backup.sysid
    assert len(other) == len(backup.sysid)
    write_sysid(target, other)
    assert archive_window(target).sysid == other
    # pg_control inside the base backup still names the real database.
    server = LocalPostgres()
    try:
        extract_base_backup(target, backup, server)
        control = subprocess.run(
            ["/usr/lib/postgresql/15/bin/pg_controldata", server.pgdata],
            capture_output=True, text=True, check=True, env={"LC_ALL": "C"},
        )  # fmt: skip
        assert f"Database system identifier:           {backup.sysid}" in control.stdout
    finally:
        server.remove()
    with pytest.raises(ValueError, match="decimal"):
        write_sysid(target, "12ab")


def test_window_follows_wal_switches_and_targets_stay_apart(
    wale_archive: WaleArchive, wale_store: ArchiveTarget
) -> None:
    before = wale_archive.window()
    wale_archive.pg.psql(
        "CREATE TABLE IF NOT EXISTS wale_filler (x int); INSERT INTO wale_filler VALUES (3)"
    )
    segment = wale_archive.switch_wal()
    after = wale_archive.window()
    assert segment in after.segments
    assert after.last == segment
    assert before.last is not None
    assert segment_number(segment) > segment_number(before.last)
    assert after.gaps(since=wale_archive.base_backup.start_segment) == []
    assert after.backups == (wale_archive.base_backup.name,)
    # The session prefix never receives this service's objects.
    assert not set(wale_store.list_keys()) & set(wale_archive.target.list_keys())
    # Each VM's envdir names this service (so a promoted standby would archive here too).
    for vm in wale_archive.cluster.vms:
        envdir = vm.host_path(VM_ENVDIR)
        assert (envdir / "WALE_S3_PREFIX").read_text().strip() == wale_archive.target.url
        assert oct(envdir.stat().st_mode & 0o777) == "0o700"
        assert oct((envdir / "AWS_SECRET_ACCESS_KEY").stat().st_mode & 0o777) == "0o600"


def test_secret_is_in_no_archive_setting_or_command_line(wale_archive: WaleArchive) -> None:
    secret = wale_archive.target.secret_key
    primary = wale_archive.primary
    command = primary.psql("SHOW archive_command")
    assert "--envdir" in command
    assert secret not in command
    assert secret not in primary.run("ps -eo args").stdout
    assert secret not in repr(wale_archive.target)


# ---------------------------------------------------------------- the archiver's contract


def _walcmd(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SYSTEM_PYTHON, str(WALCMD), *args], env=env, capture_output=True, text=True,
        check=False, timeout=120,
    )  # fmt: skip


def _segment_file(tmp_path: Path, name: str, seed: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(seed * 1000 + bytes(16 * 2**20 - len(seed) * 1000))
    return path


@pytest.mark.parametrize("server_fixture", ["moto_s3", "seaweedfs_s3"])
def test_walcmd_push_fetch_idempotent_and_signed(
    server_fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """SeaweedFS checks Signature V4: the stdlib signer must get it right."""
    server: S3Server = request.getfixturevalue(server_fixture)
    target = ArchiveTarget.on(server, server.new_bucket("walcmd"))
    envdir = tmp_path / "env"
    write_envdir(envdir, target, uid=0, gid=0)
    env = {"PATH": "/usr/bin:/bin"}
    name = "00000001000000000000000A"
    segment = _segment_file(tmp_path, name, b"first")
    pushed = _walcmd(["--envdir", str(envdir), "push", str(segment), name], env)
    assert pushed.returncode == 0, pushed.stderr
    assert target.exists(target.layout.wal_object(name))
    again = _walcmd(["--envdir", str(envdir), "push", str(segment), name], env)
    assert again.returncode == 0
    assert "already archived" in again.stderr
    other = _segment_file(tmp_path / "..", name, b"second")
    refused = _walcmd(["--envdir", str(envdir), "push", str(other), name], env)
    assert refused.returncode == 1
    assert "different content" in refused.stderr
    fetched = tmp_path / "RECOVERYXLOG"
    got = _walcmd(["--envdir", str(envdir), "fetch", name, str(fetched)], env)
    assert got.returncode == 0, got.stderr
    assert fetched.read_bytes() == segment.read_bytes()
    missing = _walcmd(
        ["--envdir", str(envdir), "fetch", "00000001000000000000000B", str(fetched)], env
    )
    assert missing.returncode == 1
    assert "not in the archive" in missing.stderr
    # A wrong secret: SeaweedFS refuses (moto accepts anything: only the signed server counts).
    (envdir / "AWS_SECRET_ACCESS_KEY").write_text("wrong-secret\n")
    denied = _walcmd(["--envdir", str(envdir), "fetch", name, str(fetched)], env)
    if server_fixture == "seaweedfs_s3":
        assert denied.returncode == 1
        assert "HTTP 403" in denied.stderr
    assert "wrong-secret" not in denied.stderr


@pytest.mark.parametrize(
    ("args", "env_extra", "code", "message"),
    [
        (["push", "x", "not-a-wal-name"], {}, 2, "not a WAL file name"),
        (["push", "x"], {}, 2, "usage"),
        (["copy", "a", "b"], {}, 2, "usage"),
        (
            ["fetch", "00000001000000000000000A", "x"],
            {"WALE_S3_PREFIX": "bucket/x"},
            2,
            "WALE_S3_PREFIX",
        ),
        (
            ["fetch", "00000001000000000000000A", "x"],
            {"WALE_S3_ENDPOINT": "ftp://h"},
            2,
            "WALE_S3_ENDPOINT",
        ),
        (["fetch", "00000001000000000000000A", "x"], {"AWS_SECRET_ACCESS_KEY": ""}, 2, "required"),
        # Nothing listens on port 9 of the loopback: exit 1, so PostgreSQL retries later.
        (["push", "/etc/hostname", "00000001000000000000000A"], {}, 1, "cannot reach"),
    ],
)
def test_walcmd_rejects_bad_input(
    args: list[str], env_extra: dict[str, str], code: int, message: str
) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "WALE_S3_PREFIX": "s3://bucket/backups/x/wal/",
        "WALE_S3_ENDPOINT": "http+path://127.0.0.1:9",
        "AWS_ACCESS_KEY_ID": "AKTEST",
        "AWS_SECRET_ACCESS_KEY": "secret-never-printed",
        **env_extra,
    }
    proc = _walcmd(args, env)
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr
    assert "secret-never-printed" not in proc.stderr + proc.stdout


def test_wal_names_accepted_are_what_postgresql_archives() -> None:
    for name in (
        "000000010000000000000002",
        "000000010000000000000002.00000028.backup",
        "00000002.history",
        "000000010000000000000003.partial",
    ):
        assert WAL_NAME_RE.match(name)
    for name in ("../etc/passwd", "00000001000000000000000g", "00000002.history.lzo", ""):
        assert not WAL_NAME_RE.match(name)


# ---------------------------------------------------------------- base backups of any server


def test_base_backup_of_a_local_server_in_several_partitions(moto_s3: S3Server) -> None:
    target = ArchiveTarget.on(moto_s3, moto_s3.new_bucket("wale-local"))
    server = LocalPostgres()
    try:
        server.initdb()
        server.set_config(server.archive_settings(target))
        server.start()
        # ~1.4 MiB of table: bigger than the 1 MiB partitions refused below, smaller than 2 MiB.
        server.psql("CREATE TABLE t AS SELECT g AS x FROM generate_series(1, 40000) g")
        size = 2 * 2**20
        backup = make_base_backup(server, target, partition_size=size)
        assert len(backup.partitions) >= 3
        assert backup.partitions == tuple(
            target.layout.partition(backup.name, i) for i in range(len(backup.partitions))
        )
        member_bytes = 0
        for key in backup.partitions:
            tar_bytes = read_lzop_object(target, key)
            with tarfile.open(fileobj=BytesIO(tar_bytes)) as tar:
                sizes = [m.size for m in tar.getmembers()]
            assert sum(sizes) < size
            member_bytes += sum(sizes)
        assert member_bytes == backup.expanded_size_bytes
        assert backup.stop_segment >= backup.start_segment
        window = archive_window(target)
        assert window.backups == (backup.name,)
        assert backup.stop_segment in window.segments
        # A file bigger than the partition size is refused, as WAL-E does.
        with pytest.raises(WaleWorldError, match="more than the partition size"):
            make_base_backup(server, target.for_service(str(uuid.uuid4())), partition_size=2**20)
    finally:
        server.remove()


# ---------------------------------------------------------------- names and positions


def test_names_and_positions_match_wale() -> None:
    # Dingo's published listing: base_000000010000000000000002_00000040 and
    # wal_005/000000010000000000000002.00000028.backup.lzo (0x28 = 40).
    lsn = parse_lsn("0/2000028")
    assert walfile_containing(1, lsn) == "000000010000000000000002"
    layout = Layout.for_service("6e101b27-ee1b-4f4d-a032-4401a3709ec3")
    assert layout.backup_name("000000010000000000000002", lsn % 2**24) == (
        "base_000000010000000000000002_00000040"
    )
    assert layout.prefix == "backups/6e101b27-ee1b-4f4d-a032-4401a3709ec3/wal/"
    # pg_walfile_name_offset: a boundary names the previous segment, offset 0.
    assert walfile_name_offset(1, parse_lsn("0/3000000")) == ("000000010000000000000002", 0)
    assert walfile_name_offset(1, parse_lsn("1/0000100")) == ("000000010000000100000000", 256)
    assert segment_number("0000000100000001000000FF") == 511
    for bad in ("6E101B27-EE1B-4F4D-A032-4401A3709EC3", "../x", ""):
        with pytest.raises(ValueError, match="GUID"):
            Layout.for_service(bad)
    with pytest.raises(ValueError, match="LSN"):
        parse_lsn("0-3")


@pytest.mark.parametrize(
    ("name", "kept"),
    [
        ("backup_label", True),
        ("postgresql.auto.conf", True),
        ("base/1/1259", True),
        ("pg_wal", True),
        ("pg_wal/000000010000000000000001", False),
        ("pg_wal/archive_status", False),
        ("postgresql.conf", False),
        ("pg_hba.conf", False),
        ("pg_ident.conf", False),
        ("postmaster.pid", False),
        ("recovery.conf", False),
        ("pg_replslot/repmgr_slot_2/state", False),
        ("base/1/pgsql_tmp/t1", False),
        ("base/postgresql.conf", True),
    ],
)
def test_partitions_keep_what_wale_keeps(name: str, kept: bool) -> None:
    assert wale_keeps(name) is kept
