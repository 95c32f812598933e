"""The files of one simulated VM: the a9s-pg job (`/var/vcap/jobs/postgresql-ha`), monit's BOSH
layout, sshd's configuration and the boot parameters of the VM's init.

Static scripts live in `vmfiles/` (they read like the real job's scripts and can be checked
with shellcheck); the per-node values (addresses, node id, passwords) are rendered here, the way
BOSH renders job templates before the first boot.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from .config import PG_BINDIR, PG_MAJOR, ClusterConfig

VMFILES = Path(__file__).with_name("vmfiles")

JOB_DIR = "/var/vcap/jobs/postgresql-ha"
PGDATA = f"/var/vcap/store/postgresql{PG_MAJOR}"
RESTORE_DIR = "/var/vcap/store/postgresql-restore"
STARTUP_LOCK_DIR = "/tmp/postgresql-startup-locks"
REPMGR_DB = "repmgr_cluster"
REPMGR_USER = "repmgr"
PGPASSFILE = f"{JOB_DIR}/config/pgpass"
REPMGR_CONFIG = f"{JOB_DIR}/config/repmgr.conf"
MONIT = "/var/vcap/bosh/bin/monit"
VARS_SH = f"{JOB_DIR}/helpers/vars.sh"
WAL_ARCHIVE_CONF = "wal-archive.conf"
# repmgr_utils.sh per helper convention (ClusterConfig.helper_privileges).
UTILS = {"caller": "repmgr_utils.sh", "helper": "repmgr_utils_self_dropping.sh"}


@dataclass(frozen=True)
class VMFile:
    """One file to create in a VM directory on the host before the VM boots."""

    path: str
    """Relative to the VM directory (`vcap/...` ends up under /var/vcap)."""
    content: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class Ids:
    """Numeric ids valid inside the VMs (the VMs' /etc/passwd is the host's plus additions)."""

    postgres_uid: int
    vcap_gid: int


def _static(name: str) -> str:
    return (VMFILES / name).read_text()


def render_vm(
    config: ClusterConfig, index: int, ids: Ids, passwords: dict[str, str]
) -> list[VMFile]:
    """Every file of VM `index` (relative to its directory on the host)."""
    address = config.vm_address(index)
    peers = " ".join(config.vm_address(i) for i in range(config.vms))
    hostname = config.vm_hostname(index)
    job = "vcap/jobs/postgresql-ha"
    q = shlex.quote

    boot_env = "\n".join(
        [
            f"VM_NAME={q(config.vm_name(index))}",
            f"VM_HOSTNAME={q(hostname)}",
            f"VM_ADDRESS={q(address)}",
            f"SSH_USER={q(config.ssh_user)}",
            f"VCAP_GID={ids.vcap_gid}",
            f"SIM_BASE={q(str(config.root))}",
            "",
        ]
    )

    vars_sh = f"""\
# /var/vcap/jobs/postgresql-ha/helpers/vars.sh (rendered for {config.vm_name(index)})
# Sourced by root shells (runbook: `source .../vars.sh`) and by the job's scripts.
export JOB_DIR={JOB_DIR}
export PATH={PG_BINDIR}:/var/vcap/bosh/bin:${{PATH:-/usr/sbin:/usr/bin:/sbin:/bin}}
export PGDATA={PGDATA}
export DATA_DIR={PGDATA}
export PGPORT=5432
export PGPASSFILE={PGPASSFILE}
export PG_MAJOR={PG_MAJOR}
export REPMGR_CONFIG={REPMGR_CONFIG}
export REPMGR_DB={REPMGR_DB}
export REPMGR_USER={REPMGR_USER}
export RUN_DIR=/var/vcap/sys/run/postgresql-ha
export LOG_DIR=/var/vcap/sys/log/postgresql-ha
export REPMGR_RUN_DIR=/var/vcap/sys/run/repmgr
export REPMGR_LOG_DIR=/var/vcap/sys/log/repmgr
export REPMGR_PIDFILE=/var/vcap/sys/run/repmgr/repmgr.pid
export STATE_DIR=/var/vcap/store/postgresql-ha
export RESTORE_DIR={RESTORE_DIR}
export STARTUP_LOCK_DIR={STARTUP_LOCK_DIR}
export NODE_INDEX={index}
export NODE_ID={index + 1}
export NODE_NAME={q(hostname)}
export NODE_ADDRESS={address}
export PEER_ADDRESSES={q(peers)}
export BOOTSTRAP={"true" if index == 0 else "false"}
export CLONE_WAIT_S={config.clone_wait_s}
# Who drops privileges around the helpers (the job's scripts read it; see ClusterConfig).
export HELPER_PRIVILEGES={config.helper_privileges}
"""

    failover_lines = ""
    if config.failover == "automatic":
        failover_lines = (
            f"promote_command='{PG_BINDIR}/repmgr standby promote -f {REPMGR_CONFIG}"
            " --log-to-file'\n"
            f"follow_command='{PG_BINDIR}/repmgr standby follow -f {REPMGR_CONFIG}"
            " --log-to-file --upstream-node-id=%n'\n"
        )
    repmgr_conf = f"""\
node_id={index + 1}
node_name='{hostname}'
conninfo='host={address} port=5432 user={REPMGR_USER} dbname={REPMGR_DB} connect_timeout=2'
data_directory='{PGDATA}'
pg_bindir='{PG_BINDIR}'
passfile='{PGPASSFILE}'
use_replication_slots=yes
log_level=INFO
log_file='/var/vcap/sys/log/repmgr/repmgrd.log'
repmgrd_pid_file='/var/vcap/sys/run/repmgr/repmgr.pid'
failover={config.failover}
{failover_lines}monitor_interval_secs=2
reconnect_attempts=3
reconnect_interval=2
"""

    postgresql_conf = f"""\
# Job configuration, included from $PGDATA/postgresql.conf (so clones inherit the include
# and each node reads its own copy).
listen_addresses = '*'
port = 5432
hba_file = '{JOB_DIR}/config/pg_hba.conf'
unix_socket_directories = '/var/run/postgresql'
max_connections = 60
shared_buffers = 32MB
dynamic_shared_memory_type = posix
wal_level = replica
wal_log_hints = on
max_wal_senders = 10
max_replication_slots = 10
hot_standby = on
wal_keep_size = 64MB
max_wal_size = 256MB
min_wal_size = 32MB
shared_preload_libraries = 'repmgr'
password_encryption = scram-sha-256
log_line_prefix = '%m [%p] %q%u@%d '
# WAL archiving (archive_mode, archive_command) for tests that need a WAL-E archive; the file
# exists only once tests/wale switches archiving on, so by default nothing is archived.
include_if_exists '{JOB_DIR}/config/{WAL_ARCHIVE_CONF}'
"""

    pg_hba = f"""\
# TYPE  DATABASE        USER            ADDRESS             METHOD
local   all             all                                 peer
local   replication     all                                 peer
host    replication     {REPMGR_USER:<15} {config.cidr:<19} scram-sha-256
host    replication     {REPMGR_USER:<15} 127.0.0.1/32        scram-sha-256
host    all             all             {config.cidr:<19} scram-sha-256
host    all             all             127.0.0.1/32        scram-sha-256
"""

    pgpass_password = passwords[REPMGR_USER].replace("\\", "\\\\").replace(":", "\\:")
    pgpass = f"*:*:*:{REPMGR_USER}:{pgpass_password}\n"

    roles = [
        "-- /var/vcap/jobs/postgresql-ha/data/create_or_update_roles_and_databases.sql",
        "-- Idempotent: creates missing roles, (re)sets their attributes and passwords, creates",
        "-- missing databases. Run as postgres with psql -f (uses \\gexec).",
    ]
    for role, password in sorted(passwords.items()):
        attrs = (
            "LOGIN SUPERUSER REPLICATION" if role == REPMGR_USER else "LOGIN CREATEDB CREATEROLE"
        )
        lit = "'" + password.replace("'", "''") + "'"
        roles += [
            f"SELECT 'CREATE ROLE {role}' WHERE NOT EXISTS "  # noqa: S608 - role names checked
            f"(SELECT FROM pg_roles WHERE rolname = '{role}')\\gexec",
            f"ALTER ROLE {role} WITH {attrs} PASSWORD {lit};",
        ]
    roles += [
        f"SELECT 'CREATE DATABASE {REPMGR_DB} OWNER {REPMGR_USER}' WHERE NOT EXISTS "  # noqa: S608 - constants
        f"(SELECT FROM pg_database WHERE datname = '{REPMGR_DB}')\\gexec",
        "",
    ]

    monitrc = f"""\
# /var/vcap/bosh/etc/monitrc (as on a BOSH stemcell, but a short cycle)
set daemon {config.monit_cycle_s}
set logfile /var/vcap/monit/monit.log
# pid and state files on /run (tmpfs): a power cut must not leave a PID that a process of the
# next boot may reuse, nor a state that makes monit start jobs before the agent ran pre-start.
set pidfile /run/monit.pid
set statefile /run/monit.state
set idfile /var/vcap/monit/monit.id
set httpd port 2822 and use address 127.0.0.1
    allow 127.0.0.1
include /var/vcap/monit/job/*.monitrc
"""

    job_monitrc = f"""\
check process postgresql-ha
  with pidfile /var/vcap/sys/run/postgresql-ha/postgresql-ha.pid
  start program "{JOB_DIR}/bin/postgresql-ha_ctl start" with timeout 180 seconds
  stop program "{JOB_DIR}/bin/postgresql-ha_ctl stop" with timeout 90 seconds
  group vcap
  onreboot nostart

check process repmgr
  with pidfile /var/vcap/sys/run/repmgr/repmgr.pid
  start program "{JOB_DIR}/bin/repmgr_ctl start" with timeout 60 seconds
  stop program "{JOB_DIR}/bin/repmgr_ctl stop" with timeout 30 seconds
  group vcap
  onreboot nostart
  depends on postgresql-ha
"""

    sshd_config = f"""\
# sshd of simulated VM {config.vm_name(index)}: key-only login, like a BOSH VM behind `bosh ssh`.
ListenAddress {address}
Port 22
HostKey /etc/ssh/ssh_host_ed25519_key
HostKey /etc/ssh/ssh_host_rsa_key
# As on a stemcell: only members of bosh_sshers log in (`bosh ssh` users are added to it).
AllowGroups bosh_sshers
PidFile /run/sshd.pid
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
UsePAM no
UseDNS no
PrintMotd no
X11Forwarding no
AcceptEnv LANG LC_*
Subsystem sftp internal-sftp
MaxStartups 100:30:200
"""

    hosts = "127.0.0.1 localhost\n" + "".join(
        f"{config.vm_address(i)} {config.vm_hostname(i)}\n" for i in range(config.vms)
    )

    v, p, g = ids.vcap_gid, ids.postgres_uid, 0
    return [
        VMFile("boot.env", boot_env),
        VMFile("init.sh", _static("init.sh"), 0o755),
        VMFile("sshd_config", sshd_config),
        VMFile("hosts", hosts),
        VMFile("vcap/bosh/bin/monit", _static("monit"), 0o755),
        VMFile(
            "monit-not-on-path",
            '#!/bin/sh\necho "monit: command not found (use /var/vcap/bosh/bin/monit)" >&2\n'
            "exit 127\n",
            0o755,
        ),
        VMFile(
            "bosh-path.sh",
            '[ "$(id -u)" -eq 0 ] && PATH=/var/vcap/bosh/bin:$PATH\n',
        ),
        VMFile("vcap/bosh/bin/bosh-agent", _static("bosh-agent"), 0o755),
        VMFile("vcap/bosh/etc/monitrc", monitrc, 0o600),
        VMFile("vcap/monit/job/0000_postgresql-ha.monitrc", job_monitrc, 0o600),
        VMFile(f"{job}/bin/pre-start", _static("pre-start"), 0o755),
        VMFile(f"{job}/bin/postgresql-ha_ctl", _static("postgresql-ha_ctl"), 0o755),
        VMFile(f"{job}/bin/repmgr_ctl", _static("repmgr_ctl"), 0o755),
        VMFile(f"{job}/helpers/vars.sh", vars_sh, 0o644),
        VMFile(f"{job}/helpers/repmgr_utils.sh", _static(UTILS[config.helper_privileges]), 0o644),
        VMFile(f"{job}/config/repmgr.conf", repmgr_conf, 0o640, g, v),
        VMFile(f"{job}/config/postgresql.conf", postgresql_conf, 0o640, g, v),
        VMFile(f"{job}/config/pg_hba.conf", pg_hba, 0o640, g, v),
        VMFile(f"{job}/config/pgpass", pgpass, 0o600, p, v),
        VMFile(
            f"{job}/data/create_or_update_roles_and_databases.sql", "\n".join(roles), 0o640, g, v
        ),
    ]
