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

import pytest

from tests.wale.archive import (
    read_lzop_object,
)
from tests.wale.simarchive import WaleArchive

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
