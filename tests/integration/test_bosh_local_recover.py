"""Local mode through the BOSH director: `pgrecovery recover` with a recovery file that names
no VM and no SSH key, and the bosh CLI's BOSH_* variables, reaches Rejoined on the simulated
cluster through the director emulator; the backup is restored on every node and no
bosh_pgrecovery_* user is left on any VM. Bad director inputs fail in Fetching with nothing
changed on the VMs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.boshdirector.director import DirectorEmulator
from tests.boshdirector.fixtures import CLIENT_ID
from tests.boshdirector.jumpbox import Jumpbox
from tests.boshdirector.tls import make_pki
from tests.objectstores.servers import S3Server
from tests.scenario import Scenario, leftover_scan
from tests.simcluster.cluster import SimCluster

pytestmark = [pytest.mark.integration, pytest.mark.vms]


def _recover(
    scenario: Scenario,
    director: DirectorEmulator,
    tmp_path: Path,
    name: str,
    **env_over: str,
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    manifest = scenario.manifest(name)
    target = manifest["spec"]["target"]
    target.pop("nodes")
    target.pop("ssh")
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    secrets = scenario.write_secrets_dir(tmp_path / "secrets")
    status_file = tmp_path / f"{name}.status.json"
    env = {
        **os.environ,
        "BOSH_ENVIRONMENT": director.url,
        "BOSH_CA_CERT": str(director.ca_cert_path),
        "BOSH_CLIENT": CLIENT_ID,
        "BOSH_CLIENT_SECRET": director.clients[CLIENT_ID].secret,
        "BOSH_DEPLOYMENT": target["deployment"],
        **env_over,
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pgrecovery.cli",
            "recover",
            "-f",
            str(path),
            "--secrets-dir",
            str(secrets),
            "--status-file",
            str(status_file),
            "--work-dir",
            str(tmp_path / "work"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    try:
        status = json.loads(status_file.read_text())["status"]
    except FileNotFoundError:
        status = {}
    return result, status


def _ours(director: DirectorEmulator, cluster: SimCluster) -> dict[str, list[str]]:
    users = director.ssh_users(cluster.config.deployment)
    return {vm: [u for u in names if "pgrecovery" in u] for vm, names in users.items()}


def test_local_recover_through_the_director_reaches_rejoined_and_leaves_no_user(
    healthy_sim_cluster: SimCluster,
    moto_s3: S3Server,
    bosh_director: DirectorEmulator,
    tmp_path: Path,
) -> None:
    cluster, d = healthy_sim_cluster, bosh_director
    scenario = Scenario.prepare(cluster, moto_s3, part_size=64 * 1024)
    result, status = _recover(scenario, d, tmp_path, "via-director")
    assert result.returncode == 0, result.stdout + result.stderr
    assert status["phase"] == "Rejoined"
    assert scenario.restored_everywhere() == {vm.name: True for vm in cluster.vms}
    pinned = json.loads(status["facts"]["boshInstances"])
    assert [(name, addr) for name, _id, addr in pinned] == [
        (vm.name, vm.address) for vm in cluster.vms
    ]
    assert _ours(d, cluster) == {vm.name: [] for vm in cluster.vms}
    setups = [t for t in d._tasks.values() if t.description == "ssh: setup"]
    cleanups = [t for t in d._tasks.values() if t.description == "ssh: cleanup"]
    assert setups, "the VMs were not opened through the director"
    assert all(t.state == "done" for t in setups + cleanups)
    assert leftover_scan(cluster, tmp_path / "work", dump_of=scenario.backup.backup_id) == []
    secret = d.clients[CLIENT_ID].secret
    assert secret not in result.stdout + result.stderr
    assert secret not in json.dumps(status)
    assert "PRIVATE KEY" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("wrong-secret", "DirectorAuthenticationFailed"),
        ("wrong-ca", "DirectorCertificateUntrusted"),
        ("unknown-deployment", "DirectorNotFound"),
        ("ssh-task-fails", "DirectorTaskFailed"),
        ("wrong-host-key", "HostKeyMismatch"),
        ("gateway-unreachable", "GatewayUnreachable"),
    ],
)
def test_bad_director_inputs_fail_in_fetching_with_nothing_changed(
    healthy_sim_cluster: SimCluster,
    moto_s3: S3Server,
    bosh_director: DirectorEmulator,
    tmp_path: Path,
    fault: str,
    reason: str,
) -> None:
    cluster, d = healthy_sim_cluster, bosh_director
    scenario = Scenario.prepare(cluster, moto_s3, part_size=64 * 1024, rows=50)
    before = {vm.name: vm.run("cat /etc/passwd").stdout for vm in cluster.vms}
    env: dict[str, str] = {}
    if fault == "wrong-secret":
        env["BOSH_CLIENT_SECRET"] = "not-the-secret"
    elif fault == "wrong-ca":
        env["BOSH_CA_CERT"] = make_pki().ca_pem
    elif fault == "unknown-deployment":
        d.deployments = {"other-deployment": d.deployments[cluster.config.deployment]}
    elif fault == "ssh-task-fails":
        d.ssh_task_error = "Action Failed ssh: Creating user: exit status 9"
    elif fault == "gateway-unreachable":
        # A jumpbox where nothing listens: the director's ssh setup ran, the VMs are never
        # reached, and the ephemeral users go again (passwd unchanged below).
        key = tmp_path / "gw_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                       check=True)
        (tmp_path / "gw_known_hosts").write_text("")
        env["BOSH_ALL_PROXY"] = f"ssh+socks5://vcap@127.0.0.1:1?private-key={key}"
        env["BOSH_GW_KNOWN_HOSTS"] = str(tmp_path / "gw_known_hosts")
        # Retryable (a jumpbox may come back); fail at the first for the test.
        env["PGRECOVERY_RETRY_LIMIT"] = "0"
    else:
        d.host_key_override["pg/1"] = cluster.vm("pg/2").rsa_host_key_public
    result, status = _recover(scenario, d, tmp_path, f"bad-{fault}", **env)
    assert result.returncode != 0, result.stdout
    assert status["phase"] == "Failed", status
    assert status["failureReason"] == reason, status.get("message")
    assert status["facts"].get("failedInPhase") == "Fetching", status["facts"]
    # nothing changed on the VMs: no user, no file of the recovery
    assert {vm.name: vm.run("cat /etc/passwd").stdout for vm in cluster.vms} == before
    assert leftover_scan(cluster, tmp_path / "nowork", dump_of=scenario.backup.backup_id) == []
    assert "not-the-secret" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("hold", "which"),
    [
        # the user exists on every VM, pgrecovery never heard back from the director
        ("after", ("ssh: setup", 1)),
        # the first phase run's own cleanup (the 1st cleanup removes stale users first)
        ("before", ("ssh: cleanup", 2)),
    ],
)
def test_killed_around_ssh_setup_or_cleanup_leaves_no_user_after_resume(
    healthy_sim_cluster: SimCluster,
    moto_s3: S3Server,
    bosh_director: DirectorEmulator,
    tmp_path: Path,
    hold: str,
    which: tuple[str, int],
) -> None:
    cluster, d = healthy_sim_cluster, bosh_director
    scenario = Scenario.prepare(cluster, moto_s3, part_size=64 * 1024, rows=100)
    (d.hold_after if hold == "after" else d.hold_before)[which[0]] = which[1]
    name = f"kill-{hold}"
    manifest = scenario.manifest(name)
    manifest["spec"]["target"].pop("nodes")
    manifest["spec"]["target"].pop("ssh")
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    secrets = scenario.write_secrets_dir(tmp_path / "secrets")
    status_file = tmp_path / f"{name}.status.json"
    env = {
        **os.environ,
        "BOSH_ENVIRONMENT": d.url,
        "BOSH_CA_CERT": str(d.ca_cert_path),
        "BOSH_CLIENT": CLIENT_ID,
        "BOSH_CLIENT_SECRET": d.clients[CLIENT_ID].secret,
    }
    argv = [
        sys.executable,
        "-m",
        "pgrecovery.cli",
        "recover",
        "-f",
        str(path),
        "--secrets-dir",
        str(secrets),
        "--status-file",
        str(status_file),
        "--work-dir",
        str(tmp_path / "work"),
    ]
    proc = subprocess.Popen(
        argv,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert d.holding.wait(300), "the director never reached the held task"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    left = _ours(d, cluster)
    assert all(len(users) == 1 for users in left.values()), left  # the killed run's user
    d.release()
    result = subprocess.run(
        [*argv, "--resume"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(status_file.read_text())["status"]["phase"] == "Rejoined"
    assert scenario.restored_everywhere() == {vm.name: True for vm in cluster.vms}
    assert _ours(d, cluster) == {vm.name: [] for vm in cluster.vms}


@pytest.mark.parametrize("how", ["spec", "env"])
def test_local_recover_through_a_jumpbox(
    healthy_sim_cluster: SimCluster,
    moto_s3: S3Server,
    bosh_director: DirectorEmulator,
    bosh_jumpbox: Jumpbox,
    bosh_cli: Path,
    tmp_path: Path,
    how: str,
) -> None:
    """target.bosh with a gateway (in the spec, or BOSH_ALL_PROXY as for `bosh ssh`): every SSH
    connection to the VMs goes through the jumpbox (each VM's sshd logs the recovery's logins
    from the jumpbox's address). The environment variant is a bosh user's shell: the director
    is an alias that the real bosh CLI wrote (`bosh alias-env`, with the CA) into the config
    named by BOSH_CONFIG, and BOSH_CA_CERT is not set."""
    cluster, d, gw = healthy_sim_cluster, bosh_director, bosh_jumpbox
    scenario = Scenario.prepare(cluster, moto_s3, part_size=64 * 1024, rows=100)
    name = f"via-jumpbox-{how}"
    if how == "env":
        key, known = tmp_path / "gw_key", tmp_path / "gw_known_hosts"
        key.write_bytes(gw.private_key)
        key.chmod(0o600)
        known.write_text(gw.known_hosts)
        home = tmp_path / "home"
        home.mkdir()
        alias = subprocess.run(
            [str(bosh_cli), "alias-env", "recovery-site", "-e", d.url, "--ca-cert",
             str(d.ca_cert_path)],
            env={"PATH": os.environ["PATH"], "HOME": str(home), "BOSH_CLIENT": CLIENT_ID,
                 "BOSH_CLIENT_SECRET": d.clients[CLIENT_ID].secret},
            capture_output=True, text=True, timeout=120, check=False)
        assert alias.returncode == 0, alias.stdout + alias.stderr
        result, status = _recover(
            scenario,
            d,
            tmp_path,
            name,
            BOSH_ENVIRONMENT="recovery-site",
            BOSH_CONFIG=str(home / ".bosh" / "config"),
            BOSH_CA_CERT="",
            BOSH_ALL_PROXY=f"ssh+socks5://{gw.user}@{gw.host}:{gw.port}?private-key={key}",
            BOSH_GW_KNOWN_HOSTS=str(known),
        )
    else:
        result, status = _recover_with_gateway_in_spec(scenario, d, gw, tmp_path, name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert status["phase"] == "Rejoined"
    assert scenario.restored_everywhere() == {vm.name: True for vm in cluster.vms}
    assert _ours(d, cluster) == {vm.name: [] for vm in cluster.vms}
    ours = f"Accepted publickey for bosh_pgrecovery_{status['facts']['localRunId']}"
    for vm in cluster.vms:
        log = vm.host_path("/var/vcap/sys/log/sshd.log").read_text()
        logins = [line for line in log.splitlines() if ours in line]
        assert logins, vm.name
        assert all(f"from {gw.host} " in line for line in logins), (vm.name, logins[-3:])


def _recover_with_gateway_in_spec(
    scenario: Scenario, d: DirectorEmulator, gw: Jumpbox, tmp_path: Path, name: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    return _recover_with_bosh_in_spec(
        scenario,
        d,
        tmp_path,
        name,
        gateway=(gw.host, gw.port, gw.user, gw.private_key, gw.known_hosts),
    )


def _recover_with_bosh_in_spec(
    scenario: Scenario,
    d: DirectorEmulator,
    tmp_path: Path,
    name: str,
    *,
    gateway: tuple[str, int, str, bytes, str] | None = None,
    instance_group: str = "pg",
    **env_over: str,
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    manifest = scenario.manifest(name)
    target = manifest["spec"]["target"]
    target.pop("nodes")
    target.pop("ssh")
    target["bosh"] = {
        "director": d.url,
        "caCertSecretRef": {"name": "bosh-director-ca", "key": "ca.crt"},
        "credentialsSecretRef": {"name": "bosh-director"},
        "instanceGroup": instance_group,
    }
    if gateway is not None:
        target["bosh"]["gateway"] = {
            "host": gateway[0],
            "port": gateway[1],
            "user": gateway[2],
            "privateKeySecretRef": {"name": "jumpbox", "key": "id_ed25519"},
            "knownHostsSecretRef": {"name": "jumpbox", "key": "known_hosts"},
        }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    secrets = scenario.write_secrets_dir(tmp_path / "secrets")
    files = {
        "bosh-director/client": CLIENT_ID.encode(),
        "bosh-director/clientSecret": d.clients[CLIENT_ID].secret.encode(),
        "bosh-director-ca/ca.crt": d.pki.ca_pem.encode(),
    }
    if gateway is not None:
        files["jumpbox/id_ed25519"] = gateway[3]
        files["jumpbox/known_hosts"] = gateway[4].encode()
    for rel, data in files.items():
        (secrets / rel).parent.mkdir(mode=0o700, exist_ok=True)
        (secrets / rel).write_bytes(data)
        (secrets / rel).chmod(0o600)
    status_file = tmp_path / f"{name}.status.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOSH_")} | env_over
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pgrecovery.cli",
            "recover",
            "-f",
            str(path),
            "--secrets-dir",
            str(secrets),
            "--status-file",
            str(status_file),
            "--work-dir",
            str(tmp_path / "work"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    return result, json.loads(status_file.read_text())["status"]


def test_unknown_instance_group_fails_in_fetching_with_nothing_changed(
    healthy_sim_cluster: SimCluster,
    moto_s3: S3Server,
    bosh_director: DirectorEmulator,
    tmp_path: Path,
) -> None:
    cluster, d = healthy_sim_cluster, bosh_director
    scenario = Scenario.prepare(cluster, moto_s3, part_size=64 * 1024, rows=50)
    before = {vm.name: vm.run("cat /etc/passwd").stdout for vm in cluster.vms}
    result, status = _recover_with_bosh_in_spec(
        scenario, d, tmp_path, "bad-group", instance_group="postgres"
    )
    assert result.returncode != 0, result.stdout
    assert status["phase"] == "Failed", status
    assert status["failureReason"] == "DirectorNotFound", status.get("message")
    assert status["facts"].get("failedInPhase") == "Fetching", status["facts"]
    assert "'postgres'" in status["message"]
    assert "groups there: pg" in status["message"]
    assert {vm.name: vm.run("cat /etc/passwd").stdout for vm in cluster.vms} == before
    assert not any(t.description == "ssh: setup" for t in d._tasks.values())
