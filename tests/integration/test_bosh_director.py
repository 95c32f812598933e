"""The BOSH director emulator checked with the real bosh CLI (built from the Go module proxy by
.ci/build-bosh.sh): `bosh instances` and `bosh ssh -c` work against it as against a director,
the ssh session reaches the simulated VM's real sshd as the ephemeral user, whose host key
came from the director, and the CLI's cleanup removes the user again."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.boshdirector.director import DirectorEmulator
from tests.boshdirector.fixtures import CLIENT_ID
from tests.boshdirector.tls import make_pki
from tests.simcluster.cluster import SimCluster

pytestmark = [pytest.mark.integration, pytest.mark.vms]


def _bosh(
    binary: Path,
    director: DirectorEmulator,
    home: Path,
    *args: str,
    secret: str | None = None,
    ca_cert: str | None = None,
) -> subprocess.CompletedProcess[str]:
    # The environment a bosh user has in their shell (what pgrecovery's local mode reads too).
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "BOSH_ENVIRONMENT": director.url,
        "BOSH_CA_CERT": ca_cert if ca_cert is not None else director.pki.ca_pem,
        "BOSH_CLIENT": CLIENT_ID,
        "BOSH_CLIENT_SECRET": secret if secret is not None else director.clients[CLIENT_ID].secret,
        "BOSH_NON_INTERACTIVE": "true",
    }
    return subprocess.run(
        [str(binary), *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def _wait_tasks_done(director: DirectorEmulator, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while any(t.state in ("queued", "processing") for t in director._tasks.values()):
        assert time.monotonic() < deadline, "director tasks still running"
        time.sleep(0.1)


def test_bosh_instances_with_explicit_flags(
    bosh_cli: Path, bosh_director: DirectorEmulator, sim_cluster: SimCluster, tmp_path: Path
) -> None:
    d = bosh_director
    proc = subprocess.run(
        [
            str(bosh_cli),
            "-e",
            d.url,
            "--ca-cert",
            str(d.ca_cert_path),
            "--client",
            CLIENT_ID,
            "--client-secret",
            d.clients[CLIENT_ID].secret,
            "-d",
            sim_cluster.config.deployment,
            "instances",
            "--json",
        ],
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(proc.stdout)["Tables"][0]["Rows"]
    got = {r["instance"].split("/")[0]: r["ips"] for r in rows}
    assert set(got) == {"pg"}
    ips = sorted(r["ips"] for r in rows)
    assert ips == sorted(vm.address for vm in sim_cluster.vms)
    assert {r["process_state"] for r in rows} == {"running"}
    assert d.tokens_issued >= 1  # through UAA, not basic auth
    assert ("GET", f"/deployments/{sim_cluster.config.deployment}/instances?format=full") in (
        d.requests
    )


def test_bosh_ssh_runs_a_command_as_the_ephemeral_user_and_cleans_up(
    bosh_cli: Path, bosh_director: DirectorEmulator, sim_cluster: SimCluster, tmp_path: Path
) -> None:
    d = bosh_director
    dep = sim_cluster.config.deployment
    proc = _bosh(bosh_cli, d, tmp_path, "-d", dep, "ssh", "pg/0", "-c", "id && sudo -n id -u")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for word in ("uid=", "bosh_", "bosh_sudoers", "bosh_sshers"):
        assert word in out, out
    assert "stdout | 0" in out, out  # passwordless sudo
    # The CLI posts cleanup without waiting for it (director/ssh.go): wait for the task.
    _wait_tasks_done(d)
    assert [t.description for t in d._tasks.values()] == ["ssh: setup", "ssh: cleanup"]
    assert all(t.state == "done" for t in d._tasks.values())
    assert d.ssh_users(dep) == {vm.name: [] for vm in sim_cluster.vms}


def test_bosh_cli_rejects_wrong_secret_and_wrong_ca(
    bosh_cli: Path, bosh_director: DirectorEmulator, sim_cluster: SimCluster, tmp_path: Path
) -> None:
    dep = sim_cluster.config.deployment
    proc = _bosh(bosh_cli, bosh_director, tmp_path, "-d", dep, "instances", secret="wrong")
    assert proc.returncode != 0
    assert "Bad credentials" in proc.stdout + proc.stderr
    other_ca = make_pki().ca_pem
    proc = _bosh(bosh_cli, bosh_director, tmp_path, "-d", dep, "instances", ca_cert=other_ca)
    assert proc.returncode != 0
    assert "certificate" in (proc.stdout + proc.stderr).lower()
    proc = _bosh(bosh_cli, bosh_director, tmp_path, "-d", "no-such-deployment", "instances")
    assert proc.returncode != 0
    assert "Deployment 'no-such-deployment' doesn't exist" in proc.stdout + proc.stderr
