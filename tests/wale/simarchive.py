"""WAL archiving switched on in the simulated a9s-pg cluster, into a WAL-E archive per service.

Why this exists: the physical-recovery tests need archives written by the cluster they later
restore onto. The a9s job would render archive settings from its BOSH manifest; here they go
into `config/wal-archive.conf`, which the job's postgresql.conf includes if it exists
(`include_if_exists`, tests/simcluster/render.py), so clusters nobody switches on behave
exactly as before.

What is written into every VM (all nodes alike, so a promoted standby archives too once its
server restarts; `archive_mode = on` archives only on a primary):

- `/var/vcap/jobs/postgresql-ha/bin/wal-e-walcmd` — a copy of `walcmd.py`
- `/var/vcap/jobs/postgresql-ha/config/wal-e/env/` — the envdir (0700/0600, owner postgres)
  with WALE_S3_PREFIX, WALE_S3_ENDPOINT and the credentials
- `/var/vcap/jobs/postgresql-ha/config/wal-archive.conf` — archive_mode, archive_command

`archive_mode` needs a server restart: `ensure_archiving` restarts the primary's PostgreSQL
through monit (as a BOSH deploy with changed config would) only when it is not on yet — once
per cluster, again after a rebuild or a failover. Switching the target to another service GUID
only rewrites the envdir (each archive_command run reads it afresh).
"""

from __future__ import annotations

import pwd
import shutil
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.simcluster.render import JOB_DIR, PGDATA, WAL_ARCHIVE_CONF

from .archive import (
    PARTITION_MAX_SZ,
    WALCMD,
    ArchiveTarget,
    ArchiveWindow,
    BaseBackup,
    WaleWorldError,
    archive_command,
    archive_window,
    drain_archive,
    make_base_backup,
    switch_wal_and_wait,
    write_envdir,
)

if TYPE_CHECKING:
    from tests.simcluster.cluster import SimCluster, SimVM

VM_WALCMD = f"{JOB_DIR}/bin/wal-e-walcmd"
VM_ENVDIR = f"{JOB_DIR}/config/wal-e/env"
VM_ARCHIVE_CONF = f"{JOB_DIR}/config/{WAL_ARCHIVE_CONF}"


class VMPostgres:
    """`archive.PostgresHost` for the PostgreSQL of one simulated VM (Unix socket, as
    postgres:vcap through chpst, like the job's own scripts)."""

    pgdata = PGDATA
    socket_dir = "/var/run/postgresql"
    port = 5432

    def __init__(self, vm: SimVM) -> None:
        self.vm = vm

    def popen_as_postgres(self, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        return self.vm.popen(["chpst", "-u", "postgres:vcap", *argv])

    def psql(self, sql: str) -> str:
        return self.vm.psql(sql)

    def __repr__(self) -> str:
        return f"<VMPostgres {self.vm.name}>"


def _vm_path(vm: SimVM, vm_path: str) -> Path:
    return vm.host_path(vm_path)


def set_archive_target(cluster: SimCluster, target: ArchiveTarget) -> None:
    """Point every VM's archive_command at `target` (rewrites the envdirs only)."""
    postgres = pwd.getpwnam("postgres")
    for vm in cluster.vms:
        write_envdir(_vm_path(vm, VM_ENVDIR), target, uid=postgres.pw_uid, gid=postgres.pw_gid)


def install_archiving(cluster: SimCluster, target: ArchiveTarget) -> None:
    """Write the program, the envdir and the archive settings into every VM."""
    command = archive_command(VM_WALCMD, VM_ENVDIR)
    conf = (
        "# Written by tests/wale/simarchive.py: WAL-E style archiving (wal_005/<file>.lzo).\n"
        "archive_mode = on\n"
        f"archive_command = '{command}'\n"
    )
    for vm in cluster.vms:
        script = _vm_path(vm, VM_WALCMD)
        script.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(WALCMD, script)
        script.chmod(0o755)
        conf_path = _vm_path(vm, VM_ARCHIVE_CONF)
        conf_path.write_text(conf)
        conf_path.chmod(0o644)
    set_archive_target(cluster, target)


def archive_mode(vm: SimVM) -> str:
    return vm.psql("SHOW archive_mode").strip()


def restart_postgresql(cluster: SimCluster, vm: SimVM, *, timeout: float = 120.0) -> None:
    """Restart PostgreSQL on `vm` through monit (stop both jobs, start both), then wait for
    the whole cluster to be healthy again (standbys reconnect on their own)."""
    vm.monit("stop", "postgresql-ha", check=True)
    _wait_monit(vm, {"postgresql-ha": "Not monitored", "repmgr": "Not monitored"}, timeout)
    vm.monit("start", "postgresql-ha", check=True)
    vm.monit("start", "repmgr", check=True)
    _wait_monit(vm, {"postgresql-ha": "OK", "repmgr": "OK"}, timeout)
    cluster.wait_healthy(timeout=timeout)


def _wait_monit(vm: SimVM, wanted: dict[str, str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    status: dict[str, str] = {}
    while time.monotonic() < deadline:
        status = vm.monit_status()
        if all(status.get(name) == state for name, state in wanted.items()):
            return
        time.sleep(0.3)
    raise WaleWorldError(f"{vm.name}: monit {status}, wanted {wanted}\n{vm.logs_tail()}")


def ensure_archiving(
    cluster: SimCluster, target: ArchiveTarget, *, timeout: float = 120.0
) -> SimVM:
    """Archiving into `target` on the current primary (idempotent); returns the primary.

    Writes the files into every VM, reloads the running servers (archive_command changes take
    effect on reload) and restarts the primary's PostgreSQL if `archive_mode` is not on yet.
    """
    install_archiving(cluster, target)
    primary = cluster.primary()
    if archive_mode(primary) != "on":
        restart_postgresql(cluster, primary, timeout=timeout)
        primary = cluster.primary()
        if archive_mode(primary) != "on":
            raise WaleWorldError(f"{primary.name}: archive_mode still off after a restart")
    for vm in cluster.vms:
        if vm.running:
            vm.psql("SELECT pg_reload_conf()", check=False)
    return primary


def switch_off_archiving(cluster: SimCluster) -> None:
    """Stop archiving (at session end, before the S3 server goes away): the command becomes
    a no-op that reports success. `archive_mode` itself stays on until the next restart, and
    with an empty `archive_command` PostgreSQL would keep every WAL segment."""
    for vm in cluster.vms:
        conf = _vm_path(vm, VM_ARCHIVE_CONF)
        if conf.exists():
            conf.write_text("archive_mode = on\narchive_command = '/bin/true'\n")
        if vm.running:
            vm.psql("SELECT pg_reload_conf()", check=False)


@dataclass
class WaleArchive:
    """A fresh WAL-E archive of the simulated cluster under one service GUID: archiving into
    it is on, and it holds one complete base backup (plus the WAL up to its end)."""

    cluster: SimCluster
    target: ArchiveTarget
    base_backup: BaseBackup

    @property
    def service_guid(self) -> str:
        return self.target.service_guid

    @property
    def primary(self) -> SimVM:
        return self.cluster.primary()

    @property
    def pg(self) -> VMPostgres:
        """The current primary's PostgreSQL (for `archive.*` and `faults.*` helpers)."""
        return VMPostgres(self.primary)

    def switch_wal(self, *, timeout: float = 90.0) -> str:
        """pg_switch_wal() and wait until the closed segment is archived; returns its name."""
        return switch_wal_and_wait(self.pg, self.target, timeout=timeout)

    def window(self) -> ArchiveWindow:
        return archive_window(self.target)

    def take_base_backup(self, **kwargs: Any) -> BaseBackup:
        """Another base backup into the same archive (`make_base_backup` keyword arguments)."""
        return make_base_backup(self.pg, self.target, **kwargs)


def start_fresh_archive(
    cluster: SimCluster,
    store: ArchiveTarget,
    *,
    service_guid: str | None = None,
    partition_size: int = PARTITION_MAX_SZ,
) -> WaleArchive:
    """Switch archiving to a new service prefix (`store`'s endpoint, bucket and credentials;
    a new GUID unless given) and take a base backup into it."""
    target = store.for_service(service_guid or str(uuid.uuid4()))
    current = cluster.primary()
    if archive_mode(current) == "on":
        # What is still queued for the previous prefix goes there, not into the new one.
        drain_archive(VMPostgres(current))
    primary = ensure_archiving(cluster, target)
    backup = make_base_backup(VMPostgres(primary), target, partition_size=partition_size)
    return WaleArchive(cluster, target, backup)
