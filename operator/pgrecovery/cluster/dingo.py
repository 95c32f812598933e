"""The Dingo runbook's cell operations over SSH: find the instance's container, read and delete
its etcd v2 keys, stop it, wipe its data directory, start it, and watch it restore.

Why this module exists: after a deleted service instance's archive has been cloned into a new
instance's prefix, the new instance must forget its own database and cluster state so that its
start-up (`restore_leader_if_missing`) restores from the archive: the runbook's `_docker stop`,
`curl $ETCD_HOST_PORT/v2/keys/service/<id>/initialize -XDELETE` (and `/optime/leader`),
`rm -rf $host_data_dir/*` and `_docker start`, each as an idempotent operation here.

Decisions recorded here:
- The docker CLI is called by its BOSH path with the cell's socket (the runbook's `_docker`
  alias), as root through `sudo -n` like every other remote command.
- etcd is reached with `curl` on the cell (as the runbook does), not through a port forward:
  Dingo's etcd listens on the cells' network, which the operator may not reach, and the cell
  has curl. The endpoint is the spec's or the container's own `ETCD_HOST_PORT`.
- `docker inspect` output carries the instance's S3 credentials in `Config.Env`: it is parsed
  here and only whitelisted variables are kept; it is never logged or put into a message.
  Neither is `docker logs` (Dingo's entrypoint prints the admin password).
- "Accepts connections" is checked without PostgreSQL client tools on the cell: the container
  holds `/leader` (Patroni takes it only as a running primary whose system id matches
  `/initialize`) and its port answers a PostgreSQL SSLRequest.
- The restored system id is read from the data directory's `global/pg_control` (its first 8
  bytes), so the verification does not trust the container's own report.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from pgrecovery.adapters.ssh import (
    CommandResult,
    RemoteShell,
    shell_script_argv,
    validate_remote_path,
)
from pgrecovery.cluster.nodes import Node
from pgrecovery.errors import ClusterError, InvalidSpec, NotReadyYet, RemoteCommandFailed

log = logging.getLogger(__name__)

_GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_CONTAINER_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")
_CONTAINER_ID = re.compile(r"^[0-9a-f]{12,64}$")
_HOST_PORT = re.compile(r"^[A-Za-z0-9.-]+:[0-9]{1,5}$")
_ETCD_URL = re.compile(r"^https?://[A-Za-z0-9.-]+:[0-9]{1,5}$")
# Variables of the container kept from `docker inspect`; the rest (credentials) is dropped.
_ENV_KEPT = ("PATRONI_SCOPE", "ETCD_HOST_PORT", "WAL_S3_BUCKET")
# etcd keys the runbook deletes so the container re-initialises from the archive.
RESET_KEYS = ("initialize", "optime/leader")

# PostgreSQL's SSLRequest (length 8, code 80877103) in octal for printf; the server answers a
# single 'N' or 'S' as soon as the postmaster accepts connections.
_PROBE = (
    'exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 3; '
    "printf '\\000\\000\\000\\010\\004\\322\\026\\057' >&3; "
    "head -c 1 <&3"
)
_WIPE = (
    '[ -d "$1" ] || { echo "no directory $1" >&2; exit 3; }; '
    'find "$1" -mindepth 1 -maxdepth 1 -exec rm -rf -- {} +; '
    '[ -z "$(ls -A -- "$1")" ]'
)
_PG_CONTROL_SYSID = 'head -c 8 -- "$1" | od -An -tu8'


@dataclass(frozen=True)
class DingoLayout:
    """Where things are on a Dingo cell and in its containers."""

    docker: str = "/var/vcap/packages/docker/bin/docker"
    docker_host: str = "unix:///var/vcap/sys/run/docker/docker.sock"
    data_mount: str = "/data"
    pgdata_subdir: str = "postgres0"
    """PG_DATA_DIR of the image: `/data/postgres0`."""
    stop_timeout_s: int = 30
    """`docker stop -t`: the runbook's logs show docker's 10 s default forcing the kill."""


@dataclass(frozen=True)
class Container:
    """A service instance's container as `docker inspect` shows it (credentials dropped)."""

    node: Node
    id: str
    name: str
    running: bool
    exit_code: int | None
    instance_id: str
    data_dir: str
    """Host path of the container's /data volume."""
    host_port: int | None
    etcd_host_port: str | None
    archive_bucket: str | None = None
    """WAL_S3_BUCKET: where the container archives and restores from."""

    @property
    def label(self) -> str:
        return f"container {self.name} on {self.node.name}"


@dataclass(frozen=True)
class Readiness:
    running: bool
    exit_code: int | None
    leader: str | None
    accepting: bool

    def ready(self, container: Container) -> bool:
        return self.running and self.leader == container.name and self.accepting


def validate_instance_id(value: str, *, field_name: str) -> str:
    if not _GUID.match(value):
        raise InvalidSpec(f"{value!r} is not a lower-case service instance GUID", field=field_name)
    return value


def etcd_base_url(container: Container, endpoint: str | None) -> str:
    """`http://host:port` of the instance's etcd: the spec's endpoint, else the container's
    ETCD_HOST_PORT (the runbook's `export $(_docker inspect … | grep ETCD_HOST_PORT)`)."""
    if endpoint is not None:
        if not _ETCD_URL.match(endpoint):
            raise InvalidSpec(f"{endpoint!r} is not an etcd URL", field="spec.target.dingo.etcd")
        return endpoint
    hp = container.etcd_host_port
    if hp is None or not _HOST_PORT.match(hp):
        raise ClusterError(
            f"{container.label} has no usable ETCD_HOST_PORT; set spec.target.dingo.etcd.endpoint",
            reason="EtcdUnknown",
        )
    return f"http://{hp}"


def _parse_inspect(node: Node, doc: dict[str, object], data_mount: str) -> Container:
    env: dict[str, str] = {}
    config = doc.get("Config")
    for entry in config.get("Env", []) if isinstance(config, dict) else []:
        key, _, value = str(entry).partition("=")
        if key in _ENV_KEPT:
            env[key] = value
    raw_state, raw_mounts = doc.get("State"), doc.get("Mounts")
    state: dict[str, object] = raw_state if isinstance(raw_state, dict) else {}
    mounts: list[object] = raw_mounts if isinstance(raw_mounts, list) else []
    source = next(
        (
            str(m.get("Source"))
            for m in mounts
            if isinstance(m, dict) and m.get("Destination") == data_mount
        ),
        "",
    )
    port: int | None = None
    host_config = doc.get("HostConfig")
    if isinstance(host_config, dict):
        bindings = (host_config.get("PortBindings") or {}).get("5432/tcp") or []
        if bindings and str(bindings[0].get("HostPort", "")).isdigit():
            port = int(bindings[0]["HostPort"])
    name = str(doc.get("Name", "")).lstrip("/")
    ident = str(doc.get("Id", ""))
    if not _CONTAINER_NAME.match(name) or not _CONTAINER_ID.match(ident):
        raise RemoteCommandFailed(f"{node.name}: docker inspect returned an unexpected container")
    exit_code = state.get("ExitCode")
    return Container(
        node=node,
        id=ident,
        name=name,
        running=bool(state.get("Running")),
        exit_code=int(exit_code) if isinstance(exit_code, int) else None,
        instance_id=env.get("PATRONI_SCOPE", ""),
        data_dir=source,
        host_port=port,
        etcd_host_port=env.get("ETCD_HOST_PORT"),
        archive_bucket=env.get("WAL_S3_BUCKET"),
    )


class DingoOperations:
    """The runbook's cell steps for one recovery. `nodes` are the cells to search."""

    def __init__(
        self, shell: RemoteShell, nodes: Sequence[Node], layout: DingoLayout | None = None
    ) -> None:
        self.shell = shell
        self.nodes = tuple(nodes)
        self.layout = layout or DingoLayout()

    async def docker(
        self, node: Node, *args: str, timeout: float = 60, check: bool = True
    ) -> CommandResult:
        argv = [self.layout.docker, "--host", self.layout.docker_host, *args]
        return await self.shell.run_root(node.endpoint, argv, timeout=timeout, check=check)

    # ------------------------------------------------------------------ finding
    async def inspect(self, node: Node, refs: Sequence[str]) -> list[Container]:
        for ref in refs:
            if not (_CONTAINER_ID.match(ref) or _CONTAINER_NAME.match(ref)):
                raise InvalidSpec(f"{ref!r} is not a container name or id")
        result = await self.docker(node, "inspect", *refs, check=False)
        if result.exit_status != 0:
            # Only stderr: stdout may hold environments with credentials.
            raise RemoteCommandFailed(
                f"{node.name}: docker inspect failed: {result.stderr.strip()[:300]}",
                exit_status=result.exit_status,
            )
        try:
            docs = json.loads(result.stdout)
        except ValueError:
            raise RemoteCommandFailed(f"{node.name}: docker inspect did not print JSON") from None
        return [
            _parse_inspect(node, d, self.layout.data_mount) for d in docs if isinstance(d, dict)
        ]

    async def find_container(self, instance_id: str, name: str | None = None) -> Container:
        """The one container (running or not) of service instance `instance_id` on the cells;
        with `name`, that container, which must belong to the instance."""
        validate_instance_id(instance_id, field_name="spec.target.dingo.instanceId")
        if name is not None and not _CONTAINER_NAME.match(name):
            raise InvalidSpec(f"{name!r} is not a container name", field="spec.target.dingo")
        found: list[Container] = []
        for node in self.nodes:
            listed = await self.docker(
                node, "ps", "-a", "--no-trunc", "--format", "{{.ID}} {{.Names}}"
            )
            ids = []
            for line in listed.stdout.splitlines():
                parts = line.split()
                if (
                    len(parts) == 2
                    and _CONTAINER_ID.match(parts[0])
                    and (name is None or parts[1] == name)
                ):
                    ids.append(parts[0])
            if ids:
                found += await self.inspect(node, ids)
        if name is not None:
            if not found:
                raise ClusterError(
                    f"no container named {name} on {', '.join(n.name for n in self.nodes)}",
                    reason="ContainerNotFound",
                )
            wrong = [c for c in found if c.instance_id != instance_id]
            if wrong:
                raise ClusterError(
                    f"{wrong[0].label} belongs to service instance {wrong[0].instance_id or '?'}, "
                    f"not {instance_id}; check spec.target.dingo",
                    reason="ContainerMismatch",
                )
        found = [c for c in found if c.instance_id == instance_id]
        if not found:
            raise ClusterError(
                f"no container of service instance {instance_id} on "
                f"{', '.join(n.name for n in self.nodes)} (looked for PATRONI_SCOPE in every "
                "container's environment); was the new instance created with the solo plan?",
                reason="ContainerNotFound",
            )
        if len(found) > 1:
            raise ClusterError(
                f"service instance {instance_id} has {len(found)} containers "
                f"({', '.join(c.label for c in found)}); recreate it with the solo plan or name "
                "one in spec.target.dingo.container",
                reason="ContainerAmbiguous",
            )
        container = found[0]
        if not container.data_dir:
            raise ClusterError(
                f"{container.label} has no {self.layout.data_mount} mount", reason="NoDataVolume"
            )
        return container

    async def refresh(self, container: Container) -> Container:
        (fresh,) = await self.inspect(container.node, [container.id])
        return fresh

    # ------------------------------------------------------------------ etcd v2
    async def _curl(self, node: Node, method: str, url: str) -> tuple[int, str]:
        result = await self.shell.run_root(
            node.endpoint,
            ["curl", "-sS", "--max-time", "10", "-X", method, "-w", "\n%{http_code}", url],
            timeout=30,
            check=False,
        )
        if result.exit_status != 0:
            raise NotReadyYet(
                f"{node.name}: etcd at {url.split('/v2/', maxsplit=1)[0]} did not answer: "
                f"{result.stderr.strip()[:200]}"
            )
        body, _, code = result.stdout.rpartition("\n")
        return (int(code) if code.strip().isdigit() else 0), body

    def _key_url(self, base: str, instance_id: str, key: str) -> str:
        validate_instance_id(instance_id, field_name="spec.target.dingo.instanceId")
        if not re.fullmatch(r"[a-z_]+(/[a-z_]+)?", key):
            raise ValueError(f"unexpected etcd key {key!r}")
        return f"{base}/v2/keys/service/{instance_id}/{key}"

    async def etcd_get(self, container: Container, base: str, key: str) -> str | None:
        """Value of `/service/<instance>/<key>`, or None when the key does not exist."""
        url = self._key_url(base, container.instance_id, key)
        code, body = await self._curl(container.node, "GET", url)
        if code == 404:
            return None
        if code != 200:
            raise RemoteCommandFailed(f"etcd GET {url}: HTTP {code}")
        try:
            value = json.loads(body)["node"]["value"]
        except (ValueError, KeyError, TypeError):
            raise RemoteCommandFailed(f"etcd GET {url}: unexpected answer") from None
        return str(value)

    async def etcd_delete(self, container: Container, base: str, key: str) -> bool:
        """Delete `/service/<instance>/<key>`; False when it did not exist (idempotent)."""
        url = self._key_url(base, container.instance_id, key)
        code, _ = await self._curl(container.node, "DELETE", url)
        if code == 404:
            return False
        if code != 200:
            raise RemoteCommandFailed(f"etcd DELETE {url}: HTTP {code}")
        return True

    # ------------------------------------------------------------------ the container
    async def ensure_stopped(self, container: Container) -> bool:
        """`docker stop`; True when it was running."""
        current = await self.refresh(container)
        if not current.running:
            return False
        await self.docker(
            container.node,
            "stop",
            "-t",
            str(self.layout.stop_timeout_s),
            container.id,
            timeout=self.layout.stop_timeout_s + 60,
        )
        if (await self.refresh(container)).running:
            raise ClusterError(f"{container.label} still runs after docker stop")
        return True

    async def ensure_started(self, container: Container) -> bool:
        """`docker start`; True when it was stopped."""
        if (await self.refresh(container)).running:
            return False
        await self.docker(container.node, "start", container.id)
        return True

    def _data_dir(self, container: Container) -> str:
        path = validate_remote_path(container.data_dir)
        # A mount source of "/" or "/var/vcap/store" would turn the wipe into a disaster.
        if len([p for p in path.split("/") if p]) < 3:
            raise ClusterError(
                f"{container.label}: refusing to wipe {path!r}: too close to the root",
                reason="UnsafeDataDir",
            )
        return path

    async def wipe_data_dir(self, container: Container) -> None:
        """Empty the container's /data volume on the cell (the runbook's `rm -rf $dir/*`,
        dot files included). Refused while the container runs."""
        path = self._data_dir(container)
        if (await self.refresh(container)).running:
            raise ClusterError(f"{container.label} is running; refusing to wipe its data")
        await self.shell.run_root(
            container.node.endpoint, shell_script_argv(_WIPE, path), timeout=600
        )

    async def data_is_empty(self, container: Container) -> bool:
        path = self._data_dir(container)
        result = await self.shell.run_root(
            container.node.endpoint,
            shell_script_argv('[ -d "$1" ] && [ -z "$(ls -A -- "$1")" ]', path),
            timeout=60,
            check=False,
        )
        return result.exit_status == 0

    async def data_sysid(self, container: Container) -> str:
        """The database system identifier in the data directory's pg_control."""
        pg_control = f"{self._data_dir(container)}/{self.layout.pgdata_subdir}/global/pg_control"
        result = await self.shell.run_root(
            container.node.endpoint, shell_script_argv(_PG_CONTROL_SYSID, pg_control), timeout=30
        )
        text = result.stdout.strip()
        if not text.isdigit():
            raise RemoteCommandFailed(
                f"{container.label}: cannot read the system id of {pg_control}"
            )
        return text

    async def readiness(self, container: Container, etcd: str) -> Readiness:
        current = await self.refresh(container)
        leader = await self.etcd_get(container, etcd, "leader")
        accepting = False
        if current.running and current.host_port is not None:
            probe = await self.shell.run_root(
                container.node.endpoint,
                shell_script_argv(_PROBE, str(current.host_port)),
                timeout=10,
                check=False,
            )
            accepting = probe.exit_status == 0 and probe.stdout in ("N", "S")
        return Readiness(current.running, current.exit_code, leader, accepting)
