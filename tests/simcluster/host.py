"""Host-side plumbing of the simulated VMs: commands, the bridge, network namespaces, mounts
and process discovery.

Everything here is idempotent and tolerant of half-built state, because the same functions
tear down after a failed bring-up and clean leftovers of a crashed run (found by name only;
no state file is trusted).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

NETNS_DIR = Path("/run/netns")


class HostCommandError(RuntimeError):
    """A host command failed; the message carries its stderr."""


def run(
    args: Sequence[str],
    *,
    check: bool = True,
    input: str | None = None,
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """Run a host command (argument list, never a shell), capturing text output."""
    proc = subprocess.run(
        list(args), input=input, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        output = proc.stderr.strip() or proc.stdout.strip()
        raise HostCommandError(f"{' '.join(args)} exited {proc.returncode}: {output}")
    return proc


# ---------------------------------------------------------------------------- network
def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def list_netns(prefix: str) -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))


def create_bridge(name: str, address_cidr: str) -> None:
    """A bridge that only connects the VMs and the host: no uplink, no forwarding set up."""
    if not link_exists(name):
        run(["ip", "link", "add", "name", name, "type", "bridge"])
    # No IPv6 on the private network: no duplicate address detection, no router solicitations.
    _sysctl(f"net/ipv6/conf/{name}/disable_ipv6", "1")
    run(["ip", "addr", "replace", address_cidr, "dev", name])
    run(["ip", "link", "set", name, "up"])


def create_vm_network(
    *, netns: str, host_if: str, tmp_if: str, bridge: str, address_cidr: str
) -> None:
    """netns + veth pair: `host_if` on the bridge, `eth0` with `address_cidr` inside.

    No default route inside: the VM reaches its /24 (the other VMs and the host) and nothing
    else.
    """
    if not netns_exists(netns):
        run(["ip", "netns", "add", netns])
    if not link_exists(host_if):
        run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", tmp_if])
        run(["ip", "link", "set", tmp_if, "netns", netns])
        run(["ip", "-n", netns, "link", "set", tmp_if, "name", "eth0"])
    _sysctl(f"net/ipv6/conf/{host_if}/disable_ipv6", "1")
    run(["ip", "link", "set", host_if, "master", bridge])
    run(["ip", "link", "set", host_if, "up"])
    run(["ip", "netns", "exec", netns, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"])
    run(["ip", "-n", netns, "addr", "replace", address_cidr, "dev", "eth0"])
    # Without lo, 127.0.0.1 (monit's HTTP interface, local psql over TCP) fails.
    run(["ip", "-n", netns, "link", "set", "lo", "up"])
    run(["ip", "-n", netns, "link", "set", "eth0", "up"])


def links_with_addresses_in(subnet_prefix: str) -> list[str]:
    """Host interfaces holding an IPv4 address that starts with `subnet_prefix` ("10.77.0.")."""
    out = run(["ip", "-o", "-4", "addr", "show"]).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[3].startswith(subnet_prefix):
            found.append(fields[1])
    return found


def set_link_up(name: str, up: bool) -> None:
    run(["ip", "link", "set", name, "up" if up else "down"])


def delete_link(name: str) -> None:
    if link_exists(name):
        run(["ip", "link", "del", name], check=False)


def delete_netns(name: str) -> None:
    if netns_exists(name):
        run(["ip", "netns", "del", name], check=False)
        if netns_exists(name):  # a busy bind mount: detach it so the name is free again
            run(["umount", "-l", str(NETNS_DIR / name)], check=False)
            (NETNS_DIR / name).unlink(missing_ok=True)


def _sysctl(path: str, value: str) -> None:
    p = Path("/proc/sys") / path
    if p.exists():
        p.write_text(value)


# ---------------------------------------------------------------------------- mounts
def _unescape_mount_path(field: str) -> str:
    return (field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")).replace(
        "\\134", "\\"
    )


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below `path` in the host's mount namespace, outermost first."""
    root = str(path.resolve() if path.exists() else path)
    found: list[Path] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mount_point = _unescape_mount_path(line.split()[4])
            if mount_point == root or mount_point.startswith(root + "/"):
                found.append(Path(mount_point))
    return found


def unmount_tree(path: Path) -> None:
    """Unmount everything at or below `path`, innermost first; lazily if something is busy."""
    for _ in range(5):
        points = mounts_under(path)
        if not points:
            return
        for mp in sorted(points, key=lambda p: len(p.parts), reverse=True):
            if run(["umount", str(mp)], check=False).returncode != 0:
                run(["umount", "-l", str(mp)], check=False)


def mount_tmpfs(target: Path, *, size_bytes: int, mode: str = "0755") -> None:
    target.mkdir(parents=True, exist_ok=True)
    run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode={mode}", "pgsim", str(target)])


def remount_tmpfs_size(target: Path, size_bytes: int) -> None:
    run(["mount", "-o", f"remount,size={size_bytes}", str(target)])


# ---------------------------------------------------------------------------- processes
def _proc_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: fields follow the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[1])


def children_of(ppid: int) -> list[int]:
    return [pid for pid in _proc_pids() if parent_pid(pid) == ppid]


def pids_in_netns(name: str) -> list[int]:
    if not netns_exists(name):
        return []
    out = run(["ip", "netns", "pids", name], check=False).stdout
    return [int(x) for x in out.split() if x.isdigit()]


def pids_mentioning(text: str) -> list[int]:
    """Processes whose command line contains `text` (our base directory marks our VMs)."""
    me = os.getpid()
    found = []
    for pid in _proc_pids():
        if pid == me:
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            found.append(pid)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def kill_and_wait(pids: Iterable[int], *, timeout: float = 10.0) -> list[int]:
    """SIGKILL `pids` and wait until they are gone; returns those still alive."""
    pids = [p for p in pids if p != os.getpid()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    remaining = [p for p in pids if alive(p)]
    while remaining and time.monotonic() < deadline:
        time.sleep(0.02)
        remaining = [p for p in remaining if alive(p)]
    return remaining
