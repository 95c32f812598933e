"""The simulated Dingo cell: one BOSH VM with etcd (v2 API), sshd and a `docker` stand-in whose
"containers" are Dingo PostgreSQL instances (PostgreSQL 15 archiving to S3 in WAL-E layout).

Why this module exists: the Dingo runbook is a sequence of commands on a cell VM — `docker ps /
inspect / stop / start`, `curl $ETCD_HOST_PORT/v2/keys/service/<id>/…`, `rm -rf` of the
container's data directory — around an S3 archive. The cell is a `SimCluster` VM (same
namespaces, sshd, monit, stand-in agent as the a9s-pg VMs) with other files: the a9s job is
replaced by an `etcd` job and by the container image in /var/vcap/packages. The a9s cluster is
unchanged; the cell only overrides `vm_files` and `health`.

A container's entrypoint (`cellfiles/run.sh`) behaves like the Dingo image's Patroni start-up
with `restore_leader_if_missing.sh`: see that file for the rules.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.simcluster.cluster import Health, SimCluster, SimClusterError, SimVM, VMCommandError
from tests.simcluster.config import ClusterConfig
from tests.simcluster.render import Ids, VMFile, render_vm
from tests.wale.archive import ArchiveTarget, make_base_backup

CELLFILES = Path(__file__).with_name("cellfiles")
WALCMD = Path(__file__).parents[1] / "wale" / "walcmd.py"
DOCKER = "/var/vcap/packages/docker/bin/docker"
DOCKER_HOST = "unix:///var/vcap/sys/run/docker/docker.sock"
IMAGE = "dingo-postgresql:15"
IMAGE_DIR = "vcap/packages/dingo-postgresql-image"
VOLUMES = "/var/vcap/store/docker/volumes"
ETCD_PORT = 2379
PG_BIN = "/usr/lib/postgresql/15/bin"

# Files of the a9s VM that every BOSH VM has (init, sshd, monit, agent); the job is not taken.
_BASE_FILES = {
    "boot.env",
    "init.sh",
    "sshd_config",
    "hosts",
    "vcap/bosh/bin/monit",
    "monit-not-on-path",
    "vcap/bosh/bin/bosh-agent",
    "vcap/bosh/etc/monitrc",
}


def cell_config(name: str, subnet: str) -> ClusterConfig:
    """One cell VM, `cell/0`, in deployment `dingo-postgresql`."""
    return ClusterConfig(
        name=name, subnet=subnet, vms=1, instance_group="cell", deployment="dingo-postgresql"
    )


@dataclass
class Instance:
    """One Dingo service instance (a solo container) on the cell."""

    cell: DingoCell
    instance_id: str
    container: str
    port: int
    bucket: str
    data_dir: str = field(init=False)

    def __post_init__(self) -> None:
        self.data_dir = f"{VOLUMES}/{self.container}/data"

    # `tests.wale.archive.PostgresHost`, so the shared base-backup maker can back it up.
    @property
    def pgdata(self) -> str:
        return f"{self.data_dir}/postgres0"

    @property
    def socket_dir(self) -> str:
        return f"{self.data_dir}/run"

    def popen_as_postgres(self, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        return self.cell.vm.popen(["chpst", "-u", "postgres:postgres", *argv])

    def archive(self) -> ArchiveTarget:
        """The instance's WAL-E archive, as the host reaches it (through the relay)."""
        return self.cell.archive_target(self.bucket, self.instance_id)

    @property
    def prefix(self) -> str:
        """The instance's archive prefix in the bucket (Dingo's, from the GUID)."""
        return f"backups/{self.instance_id}/wal/"

    def psql(self, sql: str, *, database: str = "postgres", check: bool = True) -> str:
        """SQL as postgres over the container's Unix socket (on the cell)."""
        proc = self.cell.vm.run(
            [
                "chpst",
                "-u",
                "postgres:postgres",
                f"{PG_BIN}/psql",
                "-X",
                "-qtA",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                f"{self.data_dir}/run",
                "-p",
                str(self.port),
                "-d",
                database,
                "-f",
                "-",
            ],
            input=sql,
            check=check,
            timeout=60,
        )
        return proc.stdout.rstrip("\n")

    def sysid(self) -> str:
        out = self.cell.vm.run([f"{PG_BIN}/pg_controldata", f"{self.data_dir}/postgres0"]).stdout
        for line in out.splitlines():
            if line.startswith("Database system identifier"):
                return line.split(":", 1)[1].strip()
        raise SimClusterError(f"no system identifier in pg_controldata output: {out[-300:]}")

    def docker(self, *args: str, check: bool = True) -> str:
        return self.cell.docker(*args, check=check)

    def state(self) -> dict[str, object]:
        doc = json.loads(self.docker("inspect", self.container))[0]
        return dict(doc["State"])

    def logs(self) -> str:
        return self.docker("logs", self.container, check=False)

    def wait_leader(self, *, timeout: float = 180.0) -> None:
        """Until the container holds /leader and accepts connections (or has exited)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.cell.etcd_get(f"service/{self.instance_id}/leader") == self.container:
                return
            if not self.state()["Running"]:
                raise SimClusterError(f"container {self.container} exited:\n{self.logs()[-3000:]}")
            time.sleep(0.5)
        raise SimClusterError(f"container {self.container} not leader:\n{self.logs()[-3000:]}")

    def switch_wal(self) -> None:
        """Close the current WAL segment and wait until it is archived (like archive_timeout)."""
        before = self.psql("SELECT archived_count FROM pg_stat_archiver")
        self.psql("SELECT pg_switch_wal()")
        deadline = time.monotonic() + 60
        while self.psql("SELECT archived_count FROM pg_stat_archiver") == before:
            if time.monotonic() > deadline:
                raise SimClusterError(f"WAL not archived:\n{self.logs()[-2000:]}")
            time.sleep(0.3)


class DingoCell(SimCluster):
    """A `SimCluster` of one Dingo cell VM. Build with `DingoCell(cell_config(...))`."""

    def __init__(self, config: ClusterConfig) -> None:
        super().__init__(config)
        self.s3_endpoint = ""
        """`http://<bridge address>:<port>`: the test S3 server as the containers (and the
        host) reach it, through a `TcpRelay`."""
        self.s3_credentials: tuple[str, str] = ("", "")
        self._next_port = 32768

    @property
    def vm(self) -> SimVM:
        return self.vms[0]

    @property
    def etcd_host_port(self) -> str:
        return f"{self.vm.address}:{ETCD_PORT}"

    # ------------------------------------------------------------------ building
    def vm_files(self, vm: SimVM, ids: Ids) -> list[VMFile]:
        base = render_vm(self.config, vm.index, ids, self.passwords)
        files = [f for f in base if f.path in _BASE_FILES]
        etcd_monitrc = """\
check process etcd
  with pidfile /var/vcap/sys/run/etcd/etcd.pid
  start program "/var/vcap/jobs/etcd/bin/etcd_ctl start" with timeout 60 seconds
  stop program "/var/vcap/jobs/etcd/bin/etcd_ctl stop" with timeout 30 seconds
  group vcap
  onreboot nostart
"""
        static = {
            "vcap/jobs/etcd/bin/etcd_ctl": "etcd_ctl",
            "vcap/packages/docker/bin/docker": "docker",
            f"{IMAGE_DIR}/run.sh": "run.sh",
            f"{IMAGE_DIR}/wal-e": "wal-e",
        }
        files += [
            VMFile(path, (CELLFILES / source).read_text(), 0o755) for path, source in static.items()
        ]
        # The image's WAL-E: the test world's shared archive/restore commands (tests/wale).
        files.append(VMFile(f"{IMAGE_DIR}/walcmd.py", WALCMD.read_text(), 0o755))
        files += [
            VMFile("vcap/monit/job/0000_etcd.monitrc", etcd_monitrc, 0o600),
            VMFile("vcap/jobs/etcd/config/etcd.env", f"ETCD_ADDRESS={vm.address}\n"),
            # Login shells find the docker stand-in (the runbook aliases it as `_docker`).
            VMFile(
                "bosh-path.sh",
                '[ "$(id -u)" -eq 0 ] && PATH=/var/vcap/bosh/bin:$PATH\n'
                "PATH=/var/vcap/packages/docker/bin:$PATH\n",
            ),
        ]
        return files

    def health(self) -> Health:
        h = Health()
        vm = self.vm
        if not vm.running:
            h.problems.append(f"{vm.name}: powered off")
        elif (state := vm.agent_state()) != "running":
            h.problems.append(f"{vm.name}: agent {state or 'not started'}")
        else:
            probe = vm.run(
                ["curl", "-fsS", "--max-time", "2", f"http://127.0.0.1:{ETCD_PORT}/version"],
                check=False,
            )
            if probe.returncode != 0:
                h.problems.append(f"{vm.name}: etcd not answering ({probe.stderr.strip()})")
        return h

    # ------------------------------------------------------------------ tools on the cell
    def docker(self, *args: str, check: bool = True) -> str:
        return self.vm.run([DOCKER, "--host", DOCKER_HOST, *args], check=check, timeout=120).stdout

    def etcd_get(self, key: str) -> str | None:
        out = self.vm.run(
            ["curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{ETCD_PORT}/v2/keys/{key}"]
        ).stdout
        node = json.loads(out).get("node")
        return None if node is None else node.get("value")

    def etcd_keys(self, instance_id: str) -> list[str]:
        """Every key under /service/<id>/ (recursive), sorted."""
        out = self.vm.run(
            [
                "curl",
                "-sS",
                "--max-time",
                "5",
                f"http://127.0.0.1:{ETCD_PORT}/v2/keys/service/{instance_id}?recursive=true",
            ]
        ).stdout
        found: list[str] = []

        def walk(node: dict[str, object]) -> None:
            for child in node.get("nodes", []) or []:  # type: ignore[attr-defined]
                if child.get("dir"):
                    walk(child)
                else:
                    found.append(str(child["key"]))

        doc = json.loads(out)
        if "node" in doc:
            walk(doc["node"])
        return sorted(found)

    # ------------------------------------------------------------------ instances
    def archive_target(self, bucket: str, instance_id: str) -> ArchiveTarget:
        access, secret = self.s3_credentials
        return ArchiveTarget(self.s3_endpoint, bucket, instance_id, access, secret)

    def create_instance(
        self, *, bucket: str, instance_id: str | None = None, region: str = "us-east-1"
    ) -> Instance:
        """What `cf create-service dingo-postgresql95 solo …` makes: a container on this cell
        whose first start initialises the database and holds the leader key; then its first
        base backup (the image's regular_backup.sh, here the shared base-backup maker run from
        the host) and `sysids/sysid`."""
        if not self.s3_endpoint:
            raise SimClusterError("no S3 endpoint for the containers (start the relay first)")
        access_key, secret_key = self.s3_credentials
        instance_id = instance_id or str(uuid.uuid4())
        container = f"cf-{uuid.uuid4()}"
        port = self._next_port
        self._next_port += 1
        env = {
            "NAME": container,
            "PATRONI_SCOPE": instance_id,
            "ETCD_HOST_PORT": self.etcd_host_port,
            "DOCKER_HOSTNAME": self.vm.hostname,
            "WAL_S3_BUCKET": bucket,
            "WALE_S3_ENDPOINT": self.s3_endpoint.replace("://", "+path://", 1),
            "AWS_REGION": region,
            "AWS_ACCESS_KEY_ID": access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key,
        }
        env_file = f"/var/vcap/data/broker/{container}.env"
        # Through stdin: the credentials never appear on a command line.
        self.vm.run(
            "install -d -m 0700 /var/vcap/data/broker && umask 077 && "
            f"cat > {shlex.quote(env_file)}",
            input="".join(f"{k}={v}\n" for k, v in env.items()),
        )
        self.docker(
            "run",
            "-d",
            "--name",
            container,
            "--env-file",
            env_file,
            "-p",
            f"{port}:5432",
            "-v",
            f"{VOLUMES}/{container}/data:/data",
            IMAGE,
        )
        self.vm.run(["rm", "-f", env_file])
        inst = Instance(self, instance_id, container, port, bucket)
        inst.wait_leader()
        make_base_backup(inst, inst.archive())
        return inst

    def delete_instance(self, inst: Instance) -> None:
        """What `cf delete-service` does to the cell: the container and its volume are removed
        and the instance's etcd keys deleted. The archive in S3 stays (that is the point)."""
        self.docker("rm", "-f", inst.container)
        self.vm.run(["rm", "-rf", "--", f"{VOLUMES}/{inst.container}"])
        self.vm.run(
            [
                "curl",
                "-sS",
                "--max-time",
                "5",
                "-XDELETE",
                f"http://127.0.0.1:{ETCD_PORT}/v2/keys/service/{inst.instance_id}?recursive=true",
            ]
        )


class _Closer:
    """Closes both sockets of a relayed connection once both directions have ended."""

    def __init__(self, *socks: socket.socket) -> None:
        self._socks = socks
        self._pending = 2
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            self._pending -= 1
            if self._pending == 0:
                for sock in self._socks:
                    sock.close()


class TcpRelay:
    """Forwards connections from `listen` (the bridge address, which the cell reaches) to
    `target` (a test S3 server on 127.0.0.1, which the cell's network namespace cannot reach)."""

    def __init__(self, listen_host: str, target: tuple[str, int]) -> None:
        self.target = target
        self._sock = socket.create_server((listen_host, 0))
        self.address = self._sock.getsockname()[:2]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="dingo-s3-relay", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.address[0]}:{self.address[1]}"

    def _accept(self) -> None:
        self._sock.settimeout(0.5)
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            done = _Closer(client, upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b, done), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, done: Callable[[], None]) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
        done()

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(timeout=5)


__all__ = ["DingoCell", "Instance", "TcpRelay", "VMCommandError", "cell_config"]
