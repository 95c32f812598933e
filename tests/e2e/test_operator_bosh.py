"""The operator with `target.bosh`: `kubectl apply` of a PgRecovery that names the director
instead of VMs and an SSH key reaches Rejoined on the simulated cluster through the director
emulator (directly and through a jumpbox), on the real kube-apiserver under the chart's RBAC;
a recovery whose ssh task fails ends Failed in Fetching; a deleted one goes. Every time no
bosh_pgrecovery_* user is left on any VM, and the director's client secret appears nowhere."""

from __future__ import annotations

import subprocess
import threading
from typing import Any

import pytest
import yaml

from tests.boshdirector.director import DirectorEmulator
from tests.boshdirector.fixtures import CLIENT_ID
from tests.boshdirector.jumpbox import Jumpbox
from tests.boshdirector.recovery import bosh_recovery_objects
from tests.e2e.operator_harness import Operator
from tests.objectstores.servers import S3Server
from tests.scenario import Scenario
from tests.simcluster.cluster import SimCluster

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.vms]


def _bosh_objects(
    scenario: Scenario, d: DirectorEmulator, name: str, namespace: str
) -> list[dict[str, Any]]:
    return bosh_recovery_objects(scenario, d, name, namespace, CLIENT_ID)


def _no_user_left(d: DirectorEmulator, cluster: SimCluster) -> None:
    users = d.ssh_users(cluster.config.deployment)
    assert {vm: [u for u in us if "pgrecovery" in u] for vm, us in users.items()} == {
        vm.name: [] for vm in cluster.vms
    }


def _no_secret(op: Operator, d: DirectorEmulator, name: str) -> None:
    secret = d.clients[CLIENT_ID].secret
    for text in (
        yaml.safe_dump(op.status(name)),
        yaml.safe_dump(op.events(name)),
        op.process.log_text(),
    ):
        assert secret not in text
        assert "PRIVATE KEY" not in text


def test_kubectl_apply_with_only_target_bosh_reaches_rejoined(
    operator: Operator,
    healthy_sim_cluster: SimCluster,
    moto_s3: S3Server,
    bosh_director: DirectorEmulator,
) -> None:
    cluster, d = healthy_sim_cluster, bosh_director
    scenario = Scenario.prepare(cluster, moto_s3, part_size=48 * 1024)
    operator.apply(*_bosh_objects(scenario, d, "via-director", operator.namespace))
    operator.wait("via-director", "Succeeded")
    status = operator.status("via-director")
    assert status["phase"] == "Rejoined"
    assert "boshInstances" in status["facts"]
    assert scenario.restored_everywhere() == {vm.name: True for vm in cluster.vms}
    assert any(t.description == "ssh: setup" for t in d._tasks.values())
    _no_user_left(d, cluster)
    _no_secret(operator, d, "via-director")


def test_failing_ssh_task_fails_in_fetching_and_leaves_no_user(
    operator: Operator,
    healthy_sim_cluster: SimCluster,
    moto_s3: S3Server,
    bosh_director: DirectorEmulator,
) -> None:
    cluster, d = healthy_sim_cluster, bosh_director
    scenario = Scenario.prepare(cluster, moto_s3, rows=50)
    d.ssh_task_error = "Action Failed ssh: Creating user: exit status 9"
    operator.apply(*_bosh_objects(scenario, d, "ssh-fails", operator.namespace))
    operator.wait("ssh-fails", "Failed", timeout=180)
    status = operator.status("ssh-fails")
    assert status["failureReason"] == "DirectorTaskFailed"
    assert status["facts"]["failedInPhase"] == "Fetching"
    assert "exit status 9" in status["message"]
    _no_user_left(d, cluster)
    _no_secret(operator, d, "ssh-fails")


def test_deleted_while_the_user_exists_leaves_no_user(
    operator: Operator,
    healthy_sim_cluster: SimCluster,
    moto_s3: S3Server,
    bosh_director: DirectorEmulator,
) -> None:
    """Deleted while `ssh setup` has created the user on every VM but not yet answered: the
    run stops at its next safe point, its closer and the deletion's cleanup remove the user."""
    cluster, d = healthy_sim_cluster, bosh_director
    scenario = Scenario.prepare(cluster, moto_s3, rows=50)
    d.hold_after["ssh: setup"] = 1
    operator.apply(*_bosh_objects(scenario, d, "deleted", operator.namespace))
    assert d.holding.wait(180), "ssh setup never started"
    users = d.ssh_users(cluster.config.deployment)
    assert all(any("pgrecovery" in u for u in us) for us in users.values()), users
    result: list[subprocess.CompletedProcess[str]] = []
    deleting = threading.Thread(
        target=lambda: result.append(
            operator.kubectl.delete(
                "pgr", "deleted", "-n", operator.namespace, "--wait=true", "--timeout=180s"
            )
        )
    )
    deleting.start()
    # The deletion and the answer to ssh setup race; either order must leave no user.
    d.release()
    deleting.join(timeout=240)
    assert result, "kubectl delete did not return"
    assert result[0].returncode == 0, result[0].stderr
    _no_user_left(d, cluster)
    assert cluster.health().ok


def test_through_a_jumpbox(
    operator: Operator,
    healthy_sim_cluster: SimCluster,
    moto_s3: S3Server,
    bosh_director: DirectorEmulator,
    bosh_jumpbox: Jumpbox,
) -> None:
    """target.bosh.gateway: the operator's SSH connections to the VMs all come from the
    jumpbox (each VM's sshd logs this recovery's logins from the jumpbox's address)."""
    cluster, d, gw = healthy_sim_cluster, bosh_director, bosh_jumpbox
    scenario = Scenario.prepare(cluster, moto_s3, rows=100)
    ns = operator.namespace
    objects = _bosh_objects(scenario, d, "via-jumpbox", ns)
    objects[-1]["spec"]["target"]["bosh"]["gateway"] = {
        "host": gw.host,
        "user": gw.user,
        "privateKeySecretRef": {"name": "jumpbox", "key": "id_ed25519"},
        "knownHostsSecretRef": {"name": "jumpbox", "key": "known_hosts"},
    }
    jumpbox_secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "jumpbox", "namespace": ns},
        "stringData": {"id_ed25519": gw.private_key.decode(), "known_hosts": gw.known_hosts},
    }
    operator.apply(jumpbox_secret, *objects)
    operator.wait("via-jumpbox", "Succeeded")
    assert operator.status("via-jumpbox")["phase"] == "Rejoined"
    assert scenario.restored_everywhere() == {vm.name: True for vm in cluster.vms}
    _no_user_left(d, cluster)
    uid = operator.kubectl.json("pgr", "via-jumpbox", "-n", ns)["metadata"]["uid"]
    ours = "Accepted publickey for bosh_pgrecovery_" + uid.replace("-", "")[:8]
    for vm in cluster.vms:
        log = vm.host_path("/var/vcap/sys/log/sshd.log").read_text()
        logins = [line for line in log.splitlines() if ours in line]
        assert logins, vm.name
        assert all(f"from {gw.host} " in line for line in logins), (vm.name, logins[-3:])


@pytest.mark.parametrize(
    ("hold", "which"),
    [
        # the user exists on every VM, the operator never heard back from the director
        ("after", ("ssh: setup", 1)),
        # the first phase run's own cleanup (the 1st cleanup removes stale users first)
        ("before", ("ssh: cleanup", 2)),
    ],
)
def test_operator_killed_around_ssh_setup_or_cleanup_leaves_no_user(
    operator: Operator,
    healthy_sim_cluster: SimCluster,
    moto_s3: S3Server,
    bosh_director: DirectorEmulator,
    hold: str,
    which: tuple[str, int],
) -> None:
    """SIGKILL of the operator while the director holds a task (deterministic: the emulator
    holds it until released); the restarted operator removes the dead run's user before it
    opens its own, and reaches Rejoined with no user left."""
    cluster, d = healthy_sim_cluster, bosh_director
    scenario = Scenario.prepare(cluster, moto_s3, rows=100)
    (d.hold_after if hold == "after" else d.hold_before)[which[0]] = which[1]
    name = f"killed-{hold}"
    operator.apply(*_bosh_objects(scenario, d, name, operator.namespace))
    assert d.holding.wait(300), "the director never reached the held task"
    operator.process.kill()
    users = d.ssh_users(cluster.config.deployment)
    assert all(any("pgrecovery" in u for u in us) for us in users.values()), users
    d.release()
    operator.process.start()
    operator.wait(name, "Succeeded")
    assert operator.status(name)["phase"] == "Rejoined"
    assert scenario.restored_everywhere() == {vm.name: True for vm in cluster.vms}
    _no_user_left(d, cluster)
