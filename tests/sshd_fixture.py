"""A throwaway real sshd on 127.0.0.1 for the SSH adapter's integration tests.

Why this exists: the SSH adapter must be tested against a real OpenSSH server (host-key
checks, auth failures, exec channels, connection drops), and the simulated BOSH VMs are heavier
than these tests need. The server has its own host key, its own authorized_keys and listens on
a free port; it logs in as root (so `sudo -n` works without touching the host's users or
sudoers). Nothing outside a temporary directory is changed except creating `/run/sshd`, the
privilege-separation directory sshd insists on.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SSHD = "/usr/sbin/sshd"


@dataclass(frozen=True)
class LocalSshd:
    host: str
    port: int
    user: str
    private_key: bytes
    private_key_path: Path
    known_hosts: str
    workdir: Path
    pid: int

    def wrong_known_hosts(self) -> str:
        """A known_hosts text that trusts another key for this host:port."""
        other = self.workdir / "other_host_key"
        if not other.exists():
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True
            )
        pub = (other.with_suffix(".pub")).read_text().split()
        return f"[{self.host}]:{self.port} {pub[0]} {pub[1]}\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"sshd did not listen on {port}")


def start_sshd(workdir: Path) -> tuple[LocalSshd, subprocess.Popen[bytes]]:
    if not Path(SSHD).exists() or os.geteuid() != 0:
        pytest.skip("needs root and openssh-server")
    workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o700)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    host_key = workdir / "host_ed25519"
    user_key = workdir / "id_ed25519"
    for key in (host_key, user_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (workdir / "authorized_keys").write_text(user_key.with_suffix(".pub").read_text())
    port = _free_port()
    config = workdir / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {host_key}",
                f"PidFile {workdir}/sshd.pid",
                f"AuthorizedKeysFile {workdir}/authorized_keys",
                "PermitRootLogin prohibit-password",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "StrictModes no",
                "MaxSessions 50",
                "MaxStartups 50",
                "Subsystem sftp internal-sftp",
                "",
            ]
        )
    )
    proc = subprocess.Popen(
        [SSHD, "-D", "-e", "-f", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / "sshd.log", "wb"),  # noqa: SIM115 - lives as long as sshd
    )
    _wait_port(port)
    pub = host_key.with_suffix(".pub").read_text().split()
    info = LocalSshd(
        host="127.0.0.1",
        port=port,
        user="root",
        private_key=user_key.read_bytes(),
        private_key_path=user_key,
        known_hosts=f"[127.0.0.1]:{port} {pub[0]} {pub[1]}\n",
        workdir=workdir,
        pid=proc.pid,
    )
    return info, proc


def stop_sshd(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def local_sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSshd]:
    workdir = tmp_path_factory.mktemp("sshd")
    info, proc = start_sshd(workdir)
    try:
        yield info
    finally:
        stop_sshd(proc)
        shutil.rmtree(workdir, ignore_errors=True)
