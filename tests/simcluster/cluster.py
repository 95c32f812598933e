"""The simulated a9s-pg cluster: N "BOSH VMs" on this machine, built from Linux namespaces.

Each VM is a network namespace on a private bridge plus private mount/uts/ipc/pid namespaces
whose PID 1 is `vmfiles/init.sh`. Inside run the real programs of an a9s-pg node: sshd,
monit, PostgreSQL 15 and repmgrd (via chpst), and a stand-in BOSH agent that runs the job's
pre-start and `monit start all`. See `/work/shared/reference/test-environment.md` for why it is
built this way.

The host-side state is only: a tmpfs at the base directory (the VMs' "disks"), one tmpfs per
VM for /var/vcap/store, network namespaces, veth pairs and a bridge. `teardown` removes all of
it by name, so it also cleans what a crashed run left.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import json
import os
import pwd
import secrets
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

from . import host
from .config import PG_BINDIR, ClusterConfig
from .data import cluster_show, parse_cluster_show, parse_monit_summary, streaming_standbys
from .render import (
    MONIT,
    PGDATA,
    REPMGR_CONFIG,
    REPMGR_USER,
    VARS_SH,
    Ids,
    VMFile,
    render_vm,
)

VM_PATH = "/var/vcap/bosh/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
VM_ENV = ("PATH=" + VM_PATH, "HOME=/root", "LANG=C.UTF-8", "USER=root", "LOGNAME=root")

# The base tmpfs holds the overlay upper layers, logs and /tmp of every VM (the stores have
# their own tmpfs); a cap only limits what a runaway test can take from the machine.
BASE_TMPFS_BYTES = 4 * 1024**3


class SimClusterError(RuntimeError):
    """The simulated cluster could not be built or did not become healthy."""


class ClusterInUse(SimClusterError):
    """Another live process (a test session, or the keeper of a CLI-started cluster) owns a
    cluster of this name."""


def lock_path(config: ClusterConfig) -> Path:
    """The owner lock of cluster `config` (outside its base directory, which is a mount)."""
    return Path(f"/tmp/simcluster-{config.name}.lock")


class OwnerLock:
    """flock-based ownership of a cluster name.

    The machine is shared: without it a second test session (or a bring-up "cleaning stale
    leftovers") would tear down a cluster another session is using. The kernel drops the
    lock when its holder dies, so a crashed run's cluster counts as stale, never as in use.

    The file is removed when the cluster goes down (`release(remove=True)`, `teardown`), so
    /tmp keeps no lock of a cluster that no longer exists. It is only ever unlinked by a
    process that holds the lock, and `acquire` checks after locking that the path still names
    the file it locked (else it locks the new one): two owners at once are impossible.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self, *, wait_s: float) -> None:
        if self.fd is not None:
            return
        deadline = time.monotonic() + wait_s
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() > deadline:
                    raise ClusterInUse(
                        f"cluster lock {self.path} is held by PID {holder(self.path)} "
                        f"(waited {wait_s:.0f}s); use another cluster name and subnet, or "
                        "`python -m tests.simcluster down --name ...` if it is yours"
                    ) from None
                time.sleep(0.5)
                continue
            if _names_file(self.path, fd):
                break
            os.close(fd)  # removed by its last owner while we waited: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self, *, remove: bool = False) -> None:
        """Give up ownership; `remove`: also delete the lock file (the cluster is gone)."""
        if self.fd is not None:
            if remove and _names_file(self.path, self.fd):
                self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


def _names_file(path: Path, fd: int) -> bool:
    """Whether `path` still names the open file `fd`."""
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def remove_lock(path: Path) -> bool:
    """Delete lock file `path` unless a live process holds it (taken first: see OwnerLock)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    try:
        if _names_file(path, fd):
            path.unlink(missing_ok=True)
            return True
        return False
    finally:
        os.close(fd)


def holder(path: Path) -> int | None:
    """PID recorded by the live holder of lock `path`, or None when nobody holds it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        text = Path(path).read_text().strip()
        return int(text) if text.isdigit() else -1
    finally:
        os.close(fd)
    return None


class VMCommandError(RuntimeError):
    """A command run inside a VM (through nsenter) failed."""

    def __init__(self, vm: str, command: str, proc: subprocess.CompletedProcess[str]) -> None:
        self.vm = vm
        self.command = command
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        super().__init__(
            f"on {vm}: `{command}` exited {proc.returncode}: "
            f"{(proc.stderr or proc.stdout).strip()[-2000:]}"
        )


def missing_prerequisites() -> list[str]:
    """Why the simulator cannot run here (empty when it can)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("needs root (network/mount namespaces, overlayfs, tmpfs mounts)")
    for tool in ("ip", "unshare", "nsenter", "mount", "ssh-keygen", "ssh", "chpst", "sudo"):
        if shutil.which(tool) is None:
            problems.append(f"missing command {tool}")
    for path in (
        "/usr/sbin/sshd",
        "/usr/bin/monit",
        *(
            f"{PG_BINDIR}/{b}"
            for b in ("initdb", "pg_ctl", "postgres", "psql", "repmgr", "repmgrd")
        ),
    ):
        if not os.access(path, os.X_OK):
            problems.append(f"missing {path}")
    try:
        if "overlay" not in Path("/proc/filesystems").read_text():
            problems.append("kernel without overlayfs")
    except OSError:
        problems.append("no /proc/filesystems")
    return problems


class StoreUsage(NamedTuple):
    total: int
    used: int
    free: int


@dataclass
class Health:
    """Result of one health check of the whole cluster."""

    problems: list[str] = field(default_factory=list)
    primary: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


class SimVM:
    """One simulated BOSH VM (`pg/<index>`)."""

    def __init__(self, cluster: SimCluster, index: int) -> None:
        cfg = cluster.config
        self.cluster = cluster
        self.index = index
        self.name = cfg.vm_name(index)
        """BOSH instance name, e.g. `pg/0`."""
        self.hostname = cfg.vm_hostname(index)
        """Host name inside the VM and repmgr node name, e.g. `pg-0`."""
        self.node_id = index + 1
        """repmgr node id."""
        self.address = cfg.vm_address(index)
        self.netns = cfg.netns(index)
        self.host_if = cfg.host_veth(index)
        self.dir = cfg.root / "vms" / self.hostname
        """The VM's disk on the host."""
        self.init_pid: int | None = None
        """Host PID of the VM's PID 1 while it runs."""
        self._unshare: subprocess.Popen[bytes] | None = None
        self._unplugged_by_power_cut = False

    def __repr__(self) -> str:
        return f"<SimVM {self.name} {self.address} pid1={self.init_pid}>"

    # ------------------------------------------------------------------ paths on the host
    @property
    def store_dir(self) -> Path:
        """Host path of the VM's /var/vcap/store (its own tmpfs)."""
        return self.dir / "vcap" / "store"

    def host_path(self, vm_path: str) -> Path:
        """Host path of a file under /var/vcap, /tmp or /root of the VM (read-only use)."""
        for prefix, sub in (("/var/vcap/", "vcap"), ("/tmp/", "tmp"), ("/root/", "root")):
            if vm_path.startswith(prefix):
                return self.dir / sub / vm_path[len(prefix) :]
        raise ValueError(f"{vm_path} is not under /var/vcap, /tmp or /root")

    @property
    def rsa_host_key_public(self) -> str:
        """`ssh-rsa AAAA...` of this VM's sshd: the key a BOSH director reports for it."""
        text = (self.dir / "ssh_host_rsa_key.pub").read_text().split()
        return f"{text[0]} {text[1]}"

    @property
    def host_key_public(self) -> str:
        """`ssh-ed25519 AAAA...` of this VM's sshd."""
        text = (self.dir / "ssh_host_ed25519_key.pub").read_text().split()
        return f"{text[0]} {text[1]}"

    # ------------------------------------------------------------------ power
    @property
    def running(self) -> bool:
        pid = self.init_pid
        if pid is None or not host.alive(pid):
            return False
        try:
            return str(self.dir / "init.sh").encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False

    def boot(self) -> None:
        """Power on: start PID 1 in fresh namespaces (the disk is whatever the last run left)."""
        if self.running:
            raise SimClusterError(f"{self.name} is already running")
        self._reap()
        if self._unplugged_by_power_cut:
            self.restore_network()
            self._unplugged_by_power_cut = False
        with open(self.dir / "console.log", "ab") as console:
            self._unshare = subprocess.Popen(
                [
                    "nsenter",
                    f"--net={host.NETNS_DIR / self.netns}",
                    "--",
                    "unshare",
                    "--mount",
                    "--uts",
                    "--ipc",
                    "--pid",
                    "--fork",
                    "--kill-child",
                    "--mount-proc",
                    "/bin/bash",
                    str(self.dir / "init.sh"),
                    str(self.dir),
                ],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=console,
                env=dict(e.split("=", 1) for e in VM_ENV),
                # Own session: Ctrl-C in a terminal running pytest or the CLI must not reach
                # the VMs; teardown kills them explicitly.
                start_new_session=True,
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            children = host.children_of(self._unshare.pid)
            if children:
                self.init_pid = children[0]
                return
            if self._unshare.poll() is not None:
                break
            time.sleep(0.005)
        raise SimClusterError(f"{self.name}: init did not start; console:\n{self.console_tail()}")

    def power_cut(self, *, silent: bool = False) -> None:
        """SIGKILL the VM's PID 1: every process of the VM dies at once.

        The kernel closes the dead processes' sockets, so peers normally see their connections
        end (FIN/RST), as after a crash of the software. `silent=True` unplugs the network
        first, as a real power loss does: peers' connections hang until their timeouts. The
        network comes back at the next `boot()`. Data written to the store survives (it is a
        host tmpfs: what the kernel had is kept).
        """
        if silent:
            self.cut_network()
            self._unplugged_by_power_cut = True
        if self.init_pid is not None:
            host.kill_and_wait([self.init_pid])
        self._reap()
        self.init_pid = None

    def reboot(self) -> None:
        """Power cut, then boot again on the same disk."""
        self.power_cut()
        self.boot()

    def _reap(self) -> None:
        if self._unshare is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._unshare.wait(timeout=10)
            self._unshare = None

    def wipe_data_directory(self) -> None:
        """Empty PGDATA of a powered-off VM (the runbook's `rm -r .../postgresql15/*`); its
        next boot's pre-start then clones from the registered primary."""
        if self.running:
            raise SimClusterError(f"{self.name} is running; power it off first")
        pgdata = self.store_dir / PGDATA.rsplit("/", 1)[1]
        for child in pgdata.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    # ------------------------------------------------------------------ commands inside
    def _nsenter_argv(self, command: str | Sequence[str], env: dict[str, str] | None) -> list[str]:
        if not self.running or self.init_pid is None:
            raise SimClusterError(f"{self.name} is not running")
        extra = [f"{k}={v}" for k, v in (env or {}).items()]
        argv = (
            ["/bin/bash", "-c", command] if isinstance(command, str) else [str(c) for c in command]
        )
        # -p: nsenter forks, so the command is in the VM's PID namespace and dies with it.
        return [
            "nsenter",
            "-t",
            str(self.init_pid),
            "-m",
            "-u",
            "-i",
            "-n",
            "-p",
            "--",
            "/usr/bin/env",
            "-i",
            *VM_ENV,
            *extra,
            *argv,
        ]

    def popen(
        self,
        command: str | Sequence[str],
        *,
        env: dict[str, str] | None = None,
        stdin: int | None = subprocess.DEVNULL,
        stdout: int | None = subprocess.PIPE,
        stderr: int | None = subprocess.PIPE,
    ) -> subprocess.Popen[bytes]:
        """Start `command` as root inside the VM without waiting (binary pipes), for streams."""
        return subprocess.Popen(
            self._nsenter_argv(command, env), stdin=stdin, stdout=stdout, stderr=stderr
        )

    def run(
        self,
        command: str | Sequence[str],
        *,
        check: bool = True,
        input: str | None = None,
        timeout: float = 120.0,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `command` as root inside the VM (all its namespaces, no SSH).

        A string runs with `bash -c`; a sequence runs as is. The environment is a clean root
        login environment (plus `env`), not the host's.
        """
        proc = subprocess.run(
            self._nsenter_argv(command, env),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            shown = command if isinstance(command, str) else " ".join(map(str, command))
            raise VMCommandError(self.name, shown, proc)
        return proc

    def psql(
        self,
        sql: str,
        *,
        database: str = "postgres",
        separator: str = "|",
        check: bool = True,
        timeout: float = 120.0,
    ) -> str:
        """Run `sql` (any number of statements, psql meta-commands allowed) as postgres over the
        Unix socket; returns unaligned, tuples-only output without the final newline."""
        proc = self.run(
            [
                "chpst",
                "-u",
                "postgres:vcap",
                f"{PG_BINDIR}/psql",
                "-X",
                "-q",
                "-t",
                "-A",
                "-F",
                separator,
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                database,
                "-f",
                "-",
            ],
            input=sql,
            check=check,
            timeout=timeout,
        )
        return proc.stdout.rstrip("\n")

    def monit(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        """`/var/vcap/bosh/bin/monit <args>` inside the VM."""
        return self.run([MONIT, *args], check=check)

    def monit_summary(self) -> str:
        """`monit summary` text as a person would read it."""
        return self.monit("summary").stdout

    def monit_status(self) -> dict[str, str]:
        """monit service name -> status (e.g. `OK`, `Not monitored`)."""
        return {n: s.status for n, s in parse_monit_summary(self.monit_summary()).items()}

    def is_primary(self) -> bool | None:
        """True on the primary, False on a standby, None if PostgreSQL does not answer."""
        try:
            out = self.psql("SELECT pg_is_in_recovery()", timeout=15)
        except (VMCommandError, SimClusterError, subprocess.TimeoutExpired):
            return None
        return {"f": True, "t": False}.get(out)

    # ------------------------------------------------------------------ BOSH agent
    def agent_state(self) -> str:
        """What the stand-in agent last reported: `starting`, `running`, `failing: ...`,
        or '' before it ran."""
        try:
            return (self.dir / "vcap/bosh/agent_state").read_text().strip()
        except OSError:
            return ""

    def wait_agent(self, state: str = "running", *, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while (current := self.agent_state()) != state:
            if time.monotonic() > deadline:
                raise SimClusterError(
                    f"{self.name}: agent state {current!r}, wanted {state!r}\n{self.logs_tail()}"
                )
            time.sleep(0.1)

    # ------------------------------------------------------------------ faults
    def stop_sshd(self) -> None:
        """Stop sshd's listener (existing sessions live on, as with a real sshd restart)."""
        self.run(
            "pid=$(cat /run/sshd.pid 2>/dev/null) || exit 0; kill $pid 2>/dev/null || exit 0; "
            "while kill -0 $pid 2>/dev/null; do sleep 0.02; done; rm -f /run/sshd.pid"
        )

    def start_sshd(self) -> None:
        self.run(
            "[ -s /run/sshd.pid ] && kill -0 $(cat /run/sshd.pid) 2>/dev/null && exit 0; "
            "/usr/sbin/sshd -E /var/vcap/sys/log/sshd.log"
        )

    def sshd_running(self) -> bool:
        return (
            self.run("kill -0 $(cat /run/sshd.pid 2>/dev/null) 2>/dev/null", check=False).returncode
            == 0
        )

    def cut_network(self) -> None:
        """Unplug the VM: its bridge port goes down, packets to and from it are dropped (peers
        see timeouts, not refusals)."""
        host.set_link_up(self.host_if, False)

    def restore_network(self) -> None:
        host.set_link_up(self.host_if, True)

    def store_usage(self) -> StoreUsage:
        """Bytes of /var/vcap/store: total, used, free."""
        total, used, free = shutil.disk_usage(self.store_dir)
        return StoreUsage(total, used, free)

    def limit_store_free_space(self, free_bytes: int) -> None:
        """Shrink /var/vcap/store so that about `free_bytes` remain free (page granularity)."""
        page = os.sysconf("SC_PAGE_SIZE")
        used = self.store_usage().used
        size = -(-(used + max(free_bytes, 0)) // page) * page
        host.remount_tmpfs_size(self.store_dir, max(size, page))

    def reset_store_size(self) -> None:
        host.remount_tmpfs_size(self.store_dir, self.cluster.config.store_size_bytes)

    def undo_faults(self) -> None:
        """Network plugged in, store at full size, powered on, sshd and monit jobs started.
        Leaves data and stale startup locks alone: tests that make those clean up."""
        self.restore_network()
        self._unplugged_by_power_cut = False
        self.reset_store_size()
        if not self.running:
            self.boot()
            return  # the agent runs pre-start and starts the jobs
        self.start_sshd()
        self.monit("start", "all")

    # ------------------------------------------------------------------ diagnostics
    def console_tail(self, lines: int = 40) -> str:
        return _tail(self.dir / "console.log", lines)

    def logs_tail(self, lines: int = 25) -> str:
        """The last lines of every log of the VM, for failure messages."""
        logs = [self.dir / "console.log", self.dir / "vcap/bosh/log/agent.log"]
        logs += [self.dir / "vcap/monit/monit.log"]
        logs += sorted((self.dir / "vcap/sys/log").glob("**/*.log"))
        parts = [f"== {self.name}: agent state {self.agent_state()!r}"]
        for log in logs:
            if log.is_file() and log.stat().st_size:
                parts.append(f"-- {log.relative_to(self.dir)}\n{_tail(log, lines)}")
        return "\n".join(parts)


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(none)"


def _free_gid(start: int = 2000) -> int:
    used = {g.gr_gid for g in grp.getgrall()}
    gid = start
    while gid in used:
        gid += 1
    return gid


class SimCluster:
    """A simulated a9s-pg deployment: `pg/0` … `pg/<n-1>` on a private bridge.

    Use `up()` / `down()` (or a `with` block). `SimCluster.attach(name)` rebuilds the object of
    a cluster brought up by another process (the CLI), from its state file.
    """

    def __init__(self, config: ClusterConfig | None = None) -> None:
        self.config = config or ClusterConfig()
        self.root = self.config.root
        self.vms = [SimVM(self, i) for i in range(self.config.vms)]
        self.passwords: dict[str, str] = {}
        self._lock = OwnerLock(lock_path(self.config))

    def __enter__(self) -> SimCluster:
        self.up()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    # ------------------------------------------------------------------ access details
    @property
    def ssh_user(self) -> str:
        return self.config.ssh_user

    @property
    def client_key_path(self) -> Path:
        """Private key (ed25519, OpenSSH format, mode 0600) accepted by every VM's sshd."""
        return self.root / "client" / "id_ed25519"

    @property
    def known_hosts_path(self) -> Path:
        return self.root / "client" / "known_hosts"

    @property
    def known_hosts(self) -> str:
        """known_hosts text: one `<address> ssh-ed25519 <key>` line per VM."""
        return "".join(f"{vm.address} {vm.host_key_public}\n" for vm in self.vms)

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    @property
    def repmgr_password(self) -> str:
        return self.passwords[REPMGR_USER]

    def vm(self, key: str | int) -> SimVM:
        """A VM by index, BOSH name (`pg/1`), host name (`pg-1`) or address."""
        for vm in self.vms:
            if key in (vm.index, vm.name, vm.hostname, vm.address):
                return vm
        raise KeyError(key)

    def dsn(
        self, vm: SimVM | str | int, *, user: str = "a9s_admin", database: str = "postgres"
    ) -> str:
        """libpq connection string from the host to `vm`'s PostgreSQL (password included:
        for test clients such as psycopg, never for a command line)."""
        target = vm if isinstance(vm, SimVM) else self.vm(vm)
        return (
            f"host={target.address} port=5432 dbname={database} user={user} "
            f"password={self.passwords[user]} connect_timeout=5"
        )

    def nodes_spec(self) -> list[dict[str, str]]:
        """`target.nodes` of a PgRecovery for this cluster."""
        return [{"name": vm.name, "address": vm.address} for vm in self.vms]

    def ssh_argv(
        self, vm: SimVM | str | int, *remote: str, known_hosts: Path | None = None
    ) -> list[str]:
        """The OpenSSH client command that logs into `vm` with host key verification."""
        target = vm if isinstance(vm, SimVM) else self.vm(vm)
        return [
            "ssh",
            "-i",
            str(self.client_key_path),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={known_hosts or self.known_hosts_path}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=5",
            "-o",
            "LogLevel=ERROR",
            f"{self.ssh_user}@{target.address}",
            *remote,
        ]

    def primary(self) -> SimVM:
        """The one VM whose PostgreSQL is not in recovery."""
        found = [vm for vm in self.vms if vm.running and vm.is_primary()]
        if len(found) != 1:
            raise SimClusterError(f"expected one primary, found {[vm.name for vm in found]}")
        return found[0]

    def standbys(self) -> list[SimVM]:
        primary = self.primary()
        return [vm for vm in self.vms if vm is not primary]

    # ------------------------------------------------------------------ lifecycle
    def up(self, *, timeout: float = 120.0, lock_wait_s: float = 300.0) -> None:
        """Take ownership of the cluster name (waiting up to `lock_wait_s` for another owner
        to finish), clean leftovers, build and boot every VM, wait until healthy.

        On failure everything is torn down again (unless PGSIM_KEEP_ON_FAILURE=1) and the
        error carries the tails of the VMs' logs.
        """
        problems = missing_prerequisites()
        if problems:
            raise SimClusterError("cannot run the simulated cluster: " + "; ".join(problems))
        self._lock.acquire(wait_s=lock_wait_s)
        teardown(self.config, force=True)
        # Another cluster (or anything else) on the same /24 would make routing ambiguous.
        if users := host.links_with_addresses_in(self.config.subnet + "."):
            raise SimClusterError(
                f"subnet {self.config.cidr} is already used on this host by {users}: "
                "give this cluster another `subnet` (and `name`)"
            )
        try:
            self._create()
            for vm in self.vms:
                vm.boot()
            self._save_state()
            self.wait_healthy(timeout=timeout)
        except BaseException as exc:
            logs = "\n".join(vm.logs_tail() for vm in self.vms if vm.dir.exists())
            if os.environ.get("PGSIM_KEEP_ON_FAILURE") != "1":
                self.down()
            if isinstance(exc, SimClusterError):
                raise SimClusterError(f"{exc}\n{logs}") from exc
            raise

    def down(self) -> None:
        """Stop every VM, remove every trace on the host, give up ownership."""
        for vm in self.vms:
            vm.power_cut()
        teardown(self.config, force=True)
        self._lock.release(remove=True)

    def detach(self) -> None:
        """Leave the cluster running after this process exits (the CLI's `up`): a small
        keeper process inherits the ownership lock, so other bring-ups of this name wait or
        refuse instead of tearing it down; `teardown(force=True)` (CLI `down`) kills it."""
        if self._lock.fd is None:
            raise SimClusterError("not the owner of this cluster")
        keeper = subprocess.Popen(
            # argv[0] names the base directory, so teardown finds and kills the keeper.
            [f"simcluster-keeper {self.root}/", "infinity"],
            executable="/bin/sleep",
            pass_fds=(self._lock.fd,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        os.ftruncate(self._lock.fd, 0)
        os.pwrite(self._lock.fd, f"{keeper.pid}\n".encode(), 0)
        self._lock.release()

    def fail_over(self, to: SimVM | str | int, *, timeout: float = 90.0) -> None:
        """Make `to` the primary, as after a real failover, and end with a healthy cluster.

        Power-cuts the current primary, promotes `to` (`repmgr standby promote`), lets the
        other standbys follow it (or re-clones those that cannot), then wipes the old
        primary's data directory and boots it: its pre-start clones from the new primary and
        registers it as a standby. For tests that need a primary other than pg/0.
        """
        target = to if isinstance(to, SimVM) else self.vm(to)
        old = self.primary()
        if target is old:
            return
        old.power_cut(silent=True)
        repmgr = f"source {VARS_SH}; chpst -u postgres:vcap repmgr -f {REPMGR_CONFIG}"
        target.run(f"{repmgr} standby promote")
        recloned = [old]
        for vm in self.vms:
            if vm not in (old, target):
                follow = vm.run(
                    f"{repmgr} standby follow --upstream-node-id={target.node_id}", check=False
                )
                # A standby that had received more WAL than `to` cannot follow its new
                # timeline (repmgr exit 23): clone it again, as an operator would.
                if follow.returncode != 0:
                    vm.power_cut()
                    recloned.append(vm)
        for vm in recloned:
            vm.wipe_data_directory()
            vm.boot()
        self.wait_healthy(timeout=timeout)
        if self.primary() is not target:
            raise SimClusterError(f"after failover the primary is not {target.name}")

    def heal(self, *, timeout: float = 30.0) -> None:
        """Undo the faults the controls inject (power cuts, network cuts, stopped sshd, shrunk
        stores) and wait until healthy; rebuild the cluster if it does not recover in time."""
        try:
            for vm in self.vms:
                vm.undo_faults()
            self.wait_healthy(timeout=timeout)
        except (SimClusterError, VMCommandError, host.HostCommandError):
            self.rebuild()

    def rebuild(self, *, timeout: float = 120.0) -> None:
        """A brand-new cluster in place of this one (new data, keys and passwords); keeps
        ownership of the name throughout."""
        for vm in self.vms:
            vm.power_cut()
        teardown(self.config, force=True)
        self.up(timeout=timeout)

    def _create(self) -> None:
        cfg = self.config
        host.mount_tmpfs(self.root, size_bytes=BASE_TMPFS_BYTES, mode="0700")
        ids = Ids(postgres_uid=pwd.getpwnam("postgres").pw_uid, vcap_gid=_free_gid())
        self.passwords = dict(cfg.role_passwords) or {
            REPMGR_USER: secrets.token_urlsafe(18),
            "a9s_admin": secrets.token_urlsafe(18),
        }
        client = self.root / "client"
        client.mkdir(mode=0o700)
        _keygen(self.client_key_path, "pgsim-client")
        host.create_bridge(cfg.bridge, f"{cfg.host_address}/24")
        for vm in self.vms:
            for sub in ("upper/etc", "upper/var", "upper/home", "work/etc", "work/var"):
                (vm.dir / sub).mkdir(parents=True)
            (vm.dir / "work/home").mkdir()
            (vm.dir / "tmp").mkdir()
            os.chmod(vm.dir / "tmp", 0o1777)  # noqa: S103 - it is the VM's /tmp
            (vm.dir / "root").mkdir(mode=0o700)
            host.mount_tmpfs(vm.store_dir, size_bytes=cfg.store_size_bytes)
            _keygen(vm.dir / "ssh_host_ed25519_key", f"root@{vm.hostname}")
            # The BOSH agent hands out the RSA host key as `host_public_key` (bosh ssh).
            _keygen(vm.dir / "ssh_host_rsa_key", f"root@{vm.hostname}", kind="rsa")
            libexec = vm.dir / "vcap/bosh/libexec"
            libexec.mkdir(parents=True)
            shutil.copy2("/usr/bin/monit", libexec / "monit")
            (vm.dir / "authorized_keys").write_text(
                self.client_key_path.with_suffix(".pub").read_text()
            )
            for f in self.vm_files(vm, ids):
                path = vm.dir / f.path
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(f.content)
                os.chown(path, f.uid, f.gid)
                os.chmod(path, f.mode)
            host.create_vm_network(
                netns=vm.netns,
                host_if=vm.host_if,
                tmp_if=cfg.vm_veth_tmp(vm.index),
                bridge=cfg.bridge,
                address_cidr=f"{vm.address}/24",
            )
        self.known_hosts_path.write_text(self.known_hosts)

    def vm_files(self, vm: SimVM, ids: Ids) -> list[VMFile]:
        """The files of `vm` before its first boot. A subclass with other VM roles (the Dingo
        cell of tests/dingo) overrides this; the a9s-pg cluster uses the job's files."""
        return render_vm(self.config, vm.index, ids, self.passwords)

    def _save_state(self) -> None:
        state = {
            "config": {
                "name": self.config.name,
                "vms": self.config.vms,
                "subnet": self.config.subnet,
                "base_dir": str(self.root),
                "ssh_user": self.config.ssh_user,
                "deployment": self.config.deployment,
                "instance_group": self.config.instance_group,
                "store_size_bytes": self.config.store_size_bytes,
                "monit_cycle_s": self.config.monit_cycle_s,
                "failover": self.config.failover,
                "helper_privileges": self.config.helper_privileges,
            },
            "passwords": self.passwords,
            "vms": {vm.name: {"init_pid": vm.init_pid} for vm in self.vms},
        }
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.chmod(tmp, 0o600)
        tmp.replace(self.state_path)

    @classmethod
    def attach(cls, name: str = "pgsim", base_dir: Path | None = None) -> SimCluster:
        """The cluster another process brought up (reads its state file)."""
        root = base_dir or ClusterConfig(name=name).root
        state = json.loads((root / "state.json").read_text())
        c = state["config"]
        config = ClusterConfig(
            name=c["name"],
            vms=c["vms"],
            subnet=c["subnet"],
            base_dir=Path(c["base_dir"]),
            ssh_user=c["ssh_user"],
            deployment=c["deployment"],
            instance_group=c["instance_group"],
            store_size_bytes=c["store_size_bytes"],
            monit_cycle_s=c["monit_cycle_s"],
            failover=c["failover"],
            helper_privileges=c.get("helper_privileges", "caller"),
        )
        cluster = cls(config)
        cluster.passwords = state["passwords"]
        for vm in cluster.vms:
            vm.init_pid = state["vms"][vm.name]["init_pid"]
        # A VM rebooted by another process has a new PID 1: find it by its command line.
        for vm in cluster.vms:
            if not vm.running:
                pids = [
                    p
                    for p in host.pids_mentioning(str(vm.dir / "init.sh"))
                    if Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"/bin/bash")
                ]
                vm.init_pid = pids[0] if pids else None
        return cluster

    # ------------------------------------------------------------------ health
    def health(self) -> Health:
        """Every VM running per its agent, one primary, `repmgr cluster show` with one
        `* running` primary and every standby `running` upstream of it, and every standby
        streaming in `pg_stat_replication`."""
        h = Health()
        for vm in self.vms:
            if not vm.running:
                h.problems.append(f"{vm.name}: powered off")
            elif (state := vm.agent_state()) != "running":
                h.problems.append(f"{vm.name}: agent {state or 'not started'}")
        if h.problems:
            return h
        primaries = [vm for vm in self.vms if vm.is_primary()]
        if len(primaries) != 1:
            h.problems.append(f"primaries: {[vm.name for vm in primaries]}")
            return h
        primary = primaries[0]
        h.primary = primary.name
        _, text = cluster_show(primary)
        nodes = parse_cluster_show(text)
        want = len(self.vms) - 1
        if len([n for n in nodes if n.role == "primary" and n.status == "* running"]) != 1:
            h.problems.append(f"repmgr: no single running primary:\n{text}")
        standby_rows = [
            n
            for n in nodes
            if n.role == "standby" and n.status == "running" and n.upstream == primary.hostname
        ]
        if len(standby_rows) != want:
            h.problems.append(f"repmgr: {len(standby_rows)} of {want} standbys running:\n{text}")
        streaming = streaming_standbys(primary)
        if len(streaming) != want:
            h.problems.append(f"pg_stat_replication: {len(streaming)} of {want} streaming")
        return h

    def wait_healthy(self, *, timeout: float = 90.0) -> Health:
        """Poll `health()` until it is ok; raise SimClusterError with the last problems."""
        deadline = time.monotonic() + timeout
        while True:
            h = self.health()
            if h.ok:
                return h
            if time.monotonic() > deadline:
                raise SimClusterError(
                    f"cluster not healthy after {timeout:.0f}s: " + "; ".join(h.problems)
                )
            time.sleep(0.2)

    def status_text(self) -> str:
        """What `python -m tests.simcluster status` prints."""
        lines = []
        for vm in self.vms:
            role = "-"
            if vm.running:
                primary = vm.is_primary()
                role = {True: "primary", False: "standby", None: "postgres down"}[primary]
            lines.append(
                f"{vm.name:6} {vm.address:12} {'up' if vm.running else 'off':4} "
                f"agent={vm.agent_state() or '-':10} {role}"
            )
        return "\n".join(lines)


def _keygen(path: Path, comment: str, *, kind: str = "ed25519") -> None:
    # RSA 2048 (not ssh-keygen's 3072): the type is what matters to clients, and the smaller
    # key is generated in a fraction of the time, three times per bring-up.
    size = ["-b", "2048"] if kind == "rsa" else []
    host.run(["ssh-keygen", "-q", "-t", kind, *size, "-N", "", "-C", comment, "-f", str(path)])


def teardown(config: ClusterConfig | None = None, *, force: bool = False) -> list[str]:
    """Remove every trace of cluster `config` from the host: VM processes, mounts under the
    base directory, network namespaces, veth pairs, the bridge. Safe on a half-built or
    already-removed cluster; used before bring-up to clean a crashed run's leftovers.

    Refuses (ClusterInUse) while another live process owns the cluster name, unless `force`.
    Returns what it removed (empty when there was nothing).
    """
    config = config or ClusterConfig()
    if not force and (pid := holder(lock_path(config))) is not None:
        raise ClusterInUse(f"cluster {config.name} is owned by live process {pid}")
    done: list[str] = []
    root = config.root
    prefix = f"{config.name}-"
    namespaces = [ns for ns in host.list_netns(prefix) if ns[len(prefix) :].isdigit()]

    # Processes: every VM process is in its VM's network namespace; the inits and the
    # unshare parents also carry the base directory on their command line (found even when
    # the namespace name is already gone). Killing a VM's PID 1 kills its whole PID namespace.
    pids = set(host.pids_mentioning(str(root) + "/"))
    for ns in namespaces:
        pids.update(host.pids_in_netns(ns))
    if pids:
        left = host.kill_and_wait(sorted(pids))
        done.append(f"killed {len(pids)} processes")
        if left:
            done.append(f"processes still alive: {left}")

    if host.mounts_under(root):
        host.unmount_tree(root)
        done.append(f"unmounted {root}")
    if root.exists():
        shutil.rmtree(root, ignore_errors=True)
        done.append(f"removed {root}")
    # The owner lock in /tmp, unless a live process holds it (the caller, in `down`, releases
    # and removes its own).
    if remove_lock(lock_path(config)):
        done.append(f"removed {lock_path(config)}")

    for ns in namespaces:
        host.delete_netns(ns)
        done.append(f"deleted netns {ns}")
    for i in range(10):
        for link in (config.host_veth(i), config.vm_veth_tmp(i)):
            if host.link_exists(link):
                host.delete_link(link)
                done.append(f"deleted link {link}")
    if host.link_exists(config.bridge):
        host.delete_link(config.bridge)
        done.append(f"deleted bridge {config.bridge}")
    return done


def clean_stale(config: ClusterConfig | None = None) -> list[str]:
    """Remove leftovers of an earlier, dead run of cluster `config`; refuses (ClusterInUse)
    while a live process owns it. `up()` does this itself under the ownership lock."""
    return teardown(config)
