"""The manual WAL-E restore with plain tools, into a scratch local PostgreSQL.

Why this exists: it proves an archive of the WAL-E world is restorable the way the runbook
(formats.md, "Restore without wal-e") does it — no WAL-E, no pgrecovery:

1. download the base backup's partitions and `lzop -dc part | tar -x` each into an empty
   data directory;
2. add the configuration WAL-E left out (postgresql.conf, pg_hba.conf), create
   `recovery.signal`;
3. `restore_command` that takes `wal_005/%f.lzo` and decompresses it with `lzop -dc` (the WAL
   objects are first copied to a local directory, as `aws s3 sync` would);
4. `recovery_target_time` + `recovery_target_action = 'promote'` (the default pauses).

It is also the reference the operator's physical restore is compared with.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .archive import ArchiveTarget, BaseBackup, WaleWorldError
from .localpg import LocalPgError, LocalPostgres


@dataclass(frozen=True)
class RestoreResult:
    server: LocalPostgres
    """Running (promoted) unless `started` is False."""
    started: bool
    """False when PostgreSQL stopped during recovery (see `server.log_tail()`)."""
    wal_dir: Path
    """Where the archive's `wal_005/*.lzo` were copied."""


def download(target: ArchiveTarget, key: str, dest: Path) -> Path:
    target.client().download_file(target.bucket, key, str(dest))
    return dest


def extract_base_backup(target: ArchiveTarget, backup: BaseBackup, server: LocalPostgres) -> None:
    """Steps 1 (partitions → empty data directory, owned by postgres, mode 0700)."""
    pgdata = Path(server.pgdata)
    pgdata.mkdir(mode=0o700)
    for index, key in enumerate(backup.partitions):
        part = download(target, key, server.root / f"part_{index:08d}.tar.lzo")
        proc = subprocess.run(
            f"set -o pipefail; lzop -dc {shlex.quote(str(part))} | "
            f"tar -x --no-same-owner -C {shlex.quote(str(pgdata))}",
            shell=True, executable="/bin/bash", capture_output=True, text=True, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise WaleWorldError(f"extracting {key} failed: {proc.stderr.strip()}")
        part.unlink()
    (pgdata / "pg_wal").mkdir(exist_ok=True)
    for root, dirs, files in os.walk(pgdata):
        for name in dirs + files:
            os.chown(os.path.join(root, name), server.uid, server.gid, follow_symlinks=False)
    os.chown(pgdata, server.uid, server.gid)
    pgdata.chmod(0o700)


def copy_wal(target: ArchiveTarget, server: LocalPostgres) -> Path:
    """Step 3's fetch: every `wal_005/*.lzo` object into `<root>/wal_005/`."""
    wal_dir = server.root / "wal_005"
    wal_dir.mkdir(exist_ok=True)
    for key in target.list_keys("wal_005/"):
        download(target, key, wal_dir / key.rsplit("/", 1)[1])
    for entry in [wal_dir, *wal_dir.iterdir()]:
        os.chown(entry, server.uid, server.gid)
    return wal_dir


def restore_to_time(
    target: ArchiveTarget,
    backup: BaseBackup,
    recovery_target_time: str,
    *,
    server: LocalPostgres | None = None,
    timeout: float = 180.0,
) -> RestoreResult:
    """The whole runbook; returns the promoted server, or `started=False` if recovery
    failed (a missing or corrupt WAL object ends recovery before the target: PostgreSQL
    exits with "recovery ended before configured recovery target was reached")."""
    server = server or LocalPostgres()
    extract_base_backup(target, backup, server)
    wal_dir = copy_wal(target, server)
    fetch = shlex.quote(str(wal_dir)) + "/%f.lzo"
    server.set_config(
        {
            # `test -f` first: with the shell redirection alone a missing object would leave
            # an empty %p behind (PostgreSQL ignores it, but the log is clearer this way).
            "restore_command": f"test -f {fetch} && lzop -dc {fetch} > %p",
            "recovery_target_time": recovery_target_time,
            "recovery_target_action": "promote",
        }
    )
    signal = Path(server.pgdata) / "recovery.signal"
    signal.touch()
    os.chown(signal, server.uid, server.gid)
    try:
        server.start(timeout=int(timeout))
        server.wait_until("SELECT pg_is_in_recovery()", "f", timeout=timeout)
    except LocalPgError:
        return RestoreResult(server, False, wal_dir)
    return RestoreResult(server, True, wal_dir)
