"""Settings of a simulated a9s-pg cluster and the names derived from them.

One frozen dataclass so that the pytest fixture, the `python -m tests.simcluster` command and
the benchmark build exactly the same cluster, and so that every host-side name (network
namespaces, links, the base directory) comes from one place: stale-leftover cleanup must find
the names a crashed run used without any state file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

# Linux interface names are at most 15 bytes; "<name>-br" and "<name>-v<index>" must fit.
_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,9}$")
_ROLE_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_SUBNET_RE = re.compile(r"^(?:\d{1,3}\.){2}\d{1,3}$")

PG_MAJOR = 15
PG_BINDIR = f"/usr/lib/postgresql/{PG_MAJOR}/bin"
HELPER_PRIVILEGES = ("caller", "helper")


@dataclass(frozen=True)
class ClusterConfig:
    """What to build. The defaults are the cluster the tests and the demo use."""

    name: str = "pgsim"
    """Prefix of every host-side object (netns `<name>-<i>`, bridge `<name>-br`, veth
    `<name>-v<i>`, base directory `/tmp/simcluster-<name>`). Two clusters need two names and two
    subnets."""

    vms: int = 3
    """Number of VMs: pg/0 bootstraps as primary, the others clone from it as standbys."""

    subnet: str = "10.77.0"
    """First three octets of a private /24 used only inside this machine. The host side of the
    bridge is .1 (the operator runs on the host); VM i is .(10+i)."""

    base_dir: Path | None = None
    """Where the VMs' disks live (a tmpfs mounted by the simulator). Default
    `/tmp/simcluster-<name>`; it must not be under /etc, /var, /home, /run or /usr, which the VMs
    overlay."""

    ssh_user: str = "bosh_5f0c2a9e1d"
    """Unprivileged login user with passwordless sudo, as `bosh ssh` creates."""

    deployment: str = "a9s-pg"
    """BOSH deployment name (what a PgRecovery's `target.deployment` and `confirm` hold)."""

    instance_group: str = "pg"
    """BOSH instance group: VMs are named `<instance_group>/<index>`."""

    store_size_bytes: int = 2 * 1024**3
    """Size of each VM's /var/vcap/store (a tmpfs, so only what is written uses memory)."""

    monit_cycle_s: int = 1
    """monit's `set daemon` interval. BOSH uses longer cycles; 1 s keeps tests quick."""

    failover: str = "manual"
    """repmgr `failover` setting: `manual` keeps the tests deterministic; `automatic` makes
    repmgrd promote a standby when the primary is lost."""

    clone_wait_s: int = 120
    """How long a standby's pre-start waits for a registered primary before failing."""

    helper_privileges: str = "caller"
    """Who drops privileges around the job's helper functions (repmgr_utils.sh), the two
    conventions a9s-pg clusters are seen with: `caller` — the functions run repmgr/psql bare
    and are called as postgres:vcap (the runbook's `chpst -u postgres:vcap bash -c 'source …;
    register_master_node'`); `helper` — each function wraps its repmgr/psql call in
    `chpst -u postgres:vcap` itself and must be called as root (as postgres, chpst fails with
    `unable to setgroups`). The job's own scripts call them accordingly."""

    role_passwords: dict[str, str] = field(default_factory=dict)
    """Passwords of the roles the job's SQL creates; empty means random per cluster."""

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(f"cluster name {self.name!r} must match {_NAME_RE.pattern}")
        if not _SUBNET_RE.match(self.subnet):
            raise ValueError(f"subnet {self.subnet!r} must look like '10.77.0'")
        if not 1 <= self.vms <= 9:
            raise ValueError("between 1 and 9 VMs")
        if self.failover not in ("manual", "automatic"):
            raise ValueError("failover is 'manual' or 'automatic'")
        if self.helper_privileges not in HELPER_PRIVILEGES:
            raise ValueError(f"helper_privileges is one of {HELPER_PRIVILEGES}")
        for role, password in self.role_passwords.items():
            # Role names go into SQL unquoted; passwords into SQL literals and a pgpass line.
            if not _ROLE_RE.match(role):
                raise ValueError(f"role name {role!r} must match {_ROLE_RE.pattern}")
            if not password or any(c in password for c in "\n\r"):
                raise ValueError(f"password of {role} must be one non-empty line")
        if self.role_passwords and "repmgr" not in self.role_passwords:
            raise ValueError("role_passwords must include 'repmgr'")

    # ------------------------------------------------------------------ derived names
    @property
    def root(self) -> Path:
        """The base directory (see `base_dir`)."""
        return self.base_dir if self.base_dir is not None else Path(f"/tmp/simcluster-{self.name}")

    @property
    def bridge(self) -> str:
        return f"{self.name}-br"

    @property
    def host_address(self) -> str:
        return f"{self.subnet}.1"

    @property
    def cidr(self) -> str:
        return f"{self.subnet}.0/24"

    def netns(self, index: int) -> str:
        return f"{self.name}-{index}"

    def host_veth(self, index: int) -> str:
        return f"{self.name}-v{index}"

    def vm_veth_tmp(self, index: int) -> str:
        """Name of the VM end before it moves into the namespace and becomes eth0."""
        return f"{self.name}-p{index}"

    def vm_address(self, index: int) -> str:
        return f"{self.subnet}.{10 + index}"

    def vm_name(self, index: int) -> str:
        return f"{self.instance_group}/{index}"

    def vm_hostname(self, index: int) -> str:
        return f"{self.instance_group}-{index}"
