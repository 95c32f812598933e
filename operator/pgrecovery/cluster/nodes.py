"""Validated names and the typed view of an a9s-pg cluster.

Why this module exists: every value that reaches a remote command or SQL comes from a spec a
person typed (node names, addresses, backup ids, deployment names). Validation happens here,
once, with one regular expression per kind, so that the quoting done later is a second line of
defence and not the only one. The `A9sLayout` collects every path on the VM that the runbook
names, so that a deployment whose job differs can be described instead of patched.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from pgrecovery.adapters.ssh import SshEndpoint
from pgrecovery.errors import InvalidSpec

# BOSH instance names: `<group>/<index>` or `<group>/<instance uuid>`.
_NODE_NAME = re.compile(
    r"^[a-z][a-z0-9_-]{0,62}/(?:[0-9]{1,4}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-"
    r"[0-9a-f]{12})$"
)
# RFC 1123 host names (labels of letters, digits, hyphens; no leading/trailing hyphen).
_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_BACKUP_ID = re.compile(
    r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}-[0-9]{13}$"
)
_DEPLOYMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_RUN_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_ABS_PATH = re.compile(r"^/[A-Za-z0-9._/-]+$")


def validate_node_name(name: str, *, field_name: str = "target.nodes[].name") -> str:
    if not isinstance(name, str) or not _NODE_NAME.match(name):
        raise InvalidSpec(
            f"{name!r} is not a BOSH instance name like 'pg/0'", field=field_name
        )
    return name


def validate_address(address: str, *, field_name: str = "target.nodes[].address") -> str:
    """An IPv4/IPv6 address or an RFC 1123 host name; returned normalised."""
    if not isinstance(address, str) or not address or len(address) > 253:
        raise InvalidSpec(f"{address!r} is not an address", field=field_name)
    try:
        return str(ipaddress.ip_address(address.strip("[]")))
    except ValueError:
        pass
    labels = address.rstrip(".").split(".")
    if all(_HOST_LABEL.match(label) for label in labels) and not labels[-1].isdigit():
        return address.rstrip(".").lower()
    raise InvalidSpec(
        f"{address!r} is neither an IP address nor a host name", field=field_name
    )


def validate_backup_id(backup_id: str, *, field_name: str = "spec.source.backupId") -> str:
    """`<backup-guid>-<epoch milliseconds>`, lower case (a9s GUIDs are lower case)."""
    if not isinstance(backup_id, str) or not _BACKUP_ID.match(backup_id):
        raise InvalidSpec(
            f"{backup_id!r} is not a backup id '<guid>-<13-digit epoch ms>'", field=field_name
        )
    return backup_id


def validate_deployment(name: str, *, field_name: str = "target.deployment") -> str:
    if not isinstance(name, str) or not _DEPLOYMENT.match(name):
        raise InvalidSpec(f"{name!r} is not a BOSH deployment name", field=field_name)
    return name


def validate_run_id(run_id: str) -> str:
    """Identifies one recovery run on the VMs (job ids, the clone marker): `[a-z0-9-]+`."""
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise InvalidSpec(f"{run_id!r} is not a run id ([a-z0-9-]+, at most 63 characters)")
    return run_id


def run_id_for(backup_id: str, suffix: str = "") -> str:
    """A run id derived from a backup id (and e.g. the resource's uid prefix)."""
    base = validate_backup_id(backup_id)
    tail = re.sub(r"[^a-z0-9-]", "", suffix.lower())[:8]
    # uuid (36) + '-' + 13 digits = 50; keep within 63 with an 8-char suffix.
    return validate_run_id(f"{base}-{tail}" if tail else base)


@dataclass(frozen=True)
class Node:
    """One VM of the deployment: BOSH instance name plus how to reach it."""

    name: str
    address: str
    port: int = 22

    def __post_init__(self) -> None:
        validate_node_name(self.name)
        object.__setattr__(self, "address", validate_address(self.address))
        if not 1 <= self.port <= 65535:
            raise InvalidSpec(f"port {self.port} out of range", field="target.ssh.port")

    @property
    def endpoint(self) -> SshEndpoint:
        return SshEndpoint(self.name, self.address, self.port)

    @property
    def label(self) -> str:
        return self.name


@dataclass(frozen=True)
class A9sLayout:
    """Paths of the a9s-pg job on a VM (the runbook's, with PostgreSQL's major version)."""

    postgres_major: int = 15
    jobs_dir: str = "/var/vcap/jobs/postgresql-ha"
    store_dir: str = "/var/vcap/store"
    monit: str = "/var/vcap/bosh/bin/monit"
    startup_lock_dir: str = "/tmp/postgresql-startup-locks"  # noqa: S108 - the job's path
    repmgr_config: str = "/var/vcap/jobs/postgresql-ha/config/repmgr.conf"
    """Used only when vars.sh does not export REPMGR_CONFIG itself. [U] on real a9s."""
    state_dir: str = "/var/vcap/store/pgrecovery"
    """pgrecovery's own records on the VM (jobs, step journal); persistent disk."""
    pg_service: str = "postgresql-ha"
    repmgr_service: str = "repmgr"

    def __post_init__(self) -> None:
        if not 9 <= self.postgres_major <= 99:
            raise InvalidSpec("unsupported PostgreSQL major version",
                              field="target.postgresMajorVersion")
        for name in ("jobs_dir", "store_dir", "monit", "startup_lock_dir", "repmgr_config",
                     "state_dir"):
            value = getattr(self, name)
            if not _ABS_PATH.match(value) or ".." in value:
                raise InvalidSpec(f"unsafe path {value!r}", field=name)

    @property
    def vars_sh(self) -> str:
        return f"{self.jobs_dir}/helpers/vars.sh"

    @property
    def repmgr_utils_sh(self) -> str:
        return f"{self.jobs_dir}/helpers/repmgr_utils.sh"

    @property
    def pre_start(self) -> str:
        return f"{self.jobs_dir}/bin/pre-start"

    @property
    def roles_sql(self) -> str:
        return f"{self.jobs_dir}/data/create_or_update_roles_and_databases.sql"

    @property
    def data_dir(self) -> str:
        return f"{self.store_dir}/postgresql{self.postgres_major}"

    @property
    def restore_dir(self) -> str:
        return f"{self.store_dir}/postgresql-restore"

    def dump_path(self, backup_id: str) -> str:
        return f"{self.restore_dir}/{validate_backup_id(backup_id)}.dump"

    @property
    def jobs_root(self) -> str:
        return f"{self.state_dir}/jobs"

    @property
    def journal_dir(self) -> str:
        return f"{self.state_dir}/journal"


class Role(enum.Enum):
    PRIMARY = "primary"
    STANDBY = "standby"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class NodeView:
    """What the probe saw on one node."""

    node: Node
    role: Role
    pg_running: bool
    monit: dict[str, str] = field(default_factory=dict)
    """service name → normalised monit state (see `monit.ServiceState`)."""


@dataclass(frozen=True)
class ClusterView:
    """The cluster as probed: exactly one primary, the others standbys."""

    primary: Node
    standbys: tuple[Node, ...]
    nodes: tuple[NodeView, ...]
    repmgr_rows: tuple[object, ...] = ()

    @property
    def all_nodes(self) -> tuple[Node, ...]:
        return (self.primary, *self.standbys)

    def view_of(self, node: Node) -> NodeView:
        for v in self.nodes:
            if v.node == node:
                return v
        raise KeyError(node.name)


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report of a step (the engine turns these into status and metrics)."""

    step: str
    message: str
    node: str | None = None
    done: int | None = None
    total: int | None = None


Progress = Callable[[ProgressEvent], None]


def no_progress(event: ProgressEvent) -> None:
    """Default progress callback: discard."""


def validate_nodes(nodes: list[Node] | tuple[Node, ...]) -> tuple[Node, ...]:
    if not nodes:
        raise InvalidSpec("at least one node is needed", field="target.nodes")
    names = [n.name for n in nodes]
    addrs = [(n.address, n.port) for n in nodes]
    if len(set(names)) != len(names):
        raise InvalidSpec("node names must be unique", field="target.nodes")
    if len(set(addrs)) != len(addrs):
        raise InvalidSpec("node addresses must be unique", field="target.nodes")
    return tuple(nodes)
