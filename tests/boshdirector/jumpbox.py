"""A jumpbox for the director tests: a network namespace on the simulated VMs' bridge with its
own sshd (`<subnet>.250`), as the BOSH jumpbox an operator reaches first. pgrecovery's
`target.bosh.gateway` tunnels every SSH connection to the VMs through it; each VM's sshd log
then shows its logins coming from the jumpbox's address."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.simcluster import host
from tests.simcluster.cluster import SimCluster

SSHD = "/usr/sbin/sshd"


@dataclass(frozen=True)
class Jumpbox:
    host: str
    port: int
    user: str
    private_key: bytes
    known_hosts: str
    netns: str


def _names(cluster: SimCluster) -> tuple[str, str, str]:
    name = cluster.config.name
    return f"{name}-gw", f"{name}gwh"[:15], f"{name}gwt"[:15]


def start_jumpbox(cluster: SimCluster, workdir: Path) -> tuple[Jumpbox, subprocess.Popen[bytes]]:
    netns, host_if, tmp_if = _names(cluster)
    address = f"{cluster.config.subnet}.250"
    host.create_vm_network(
        netns=netns,
        host_if=host_if,
        tmp_if=tmp_if,
        bridge=cluster.config.bridge,
        address_cidr=f"{address}/24",
    )
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o700)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    host_key, user_key = workdir / "host_ed25519", workdir / "id_ed25519"
    for key in (host_key, user_key):
        key.unlink(missing_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (workdir / "authorized_keys").write_text(user_key.with_suffix(".pub").read_text())
    config = workdir / "sshd_config"
    config.write_text(
        f"ListenAddress {address}\nPort 22\nHostKey {host_key}\nPidFile {workdir}/sshd.pid\n"
        f"AuthorizedKeysFile {workdir}/authorized_keys\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        "StrictModes no\nAllowTcpForwarding yes\nMaxStartups 100:30:200\n"
    )
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, SSHD, "-D", "-e", "-f", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / "sshd.log", "wb"),  # noqa: SIM115 - lives as long as sshd
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        probe = subprocess.run(
            ["ip", "netns", "exec", netns, "ss", "-ltn", "sport = :22"],
            capture_output=True,
            text=True,
            check=False,
        )
        if address in probe.stdout:
            break
        time.sleep(0.05)
    else:
        proc.kill()
        raise RuntimeError(f"jumpbox sshd did not listen: {(workdir / 'sshd.log').read_text()}")
    pub = host_key.with_suffix(".pub").read_text().split()
    return (
        Jumpbox(
            host=address,
            port=22,
            user="root",
            private_key=user_key.read_bytes(),
            known_hosts=f"{address} {pub[0]} {pub[1]}\n",
            netns=netns,
        ),
        proc,
    )


def stop_jumpbox(cluster: SimCluster, proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    netns, host_if, _ = _names(cluster)
    host.delete_link(host_if)
    host.delete_netns(netns)


@pytest.fixture
def bosh_jumpbox(sim_cluster: SimCluster, tmp_path: Path) -> Iterator[Jumpbox]:
    box, proc = start_jumpbox(sim_cluster, tmp_path / "jumpbox")
    try:
        yield box
    finally:
        stop_jumpbox(sim_cluster, proc)
        shutil.rmtree(tmp_path / "jumpbox", ignore_errors=True)
