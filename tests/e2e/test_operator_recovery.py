"""The product as users meet it: `kubectl apply` a PgRecovery → the operator (a real `kopf run`
subprocess with the real plan) restores the simulated a9s-pg cluster from S3 or Azure.

Secrets are real Kubernetes Secrets in the real API server (tests/realkube; each test in its
own namespace; the operator as its own system:masters user); the VMs, sshd, PostgreSQL,
repmgr, monit, the S3 server and Azurite are real. Checked afterwards: data equal to the
backup on every node, cluster healthy, status/conditions/events, the metrics endpoint, and no
secret in the status, events or operator log.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.operator_harness import Operator
from tests.kubeapi.harness import wait_for
from tests.objectstores.servers import AzuriteServer, S3Server
from tests.scenario import KEY_KEY, KEY_SECRET, Scenario, leftover_scan
from tests.simcluster.cluster import SimCluster
from tests.simcluster.data import table_checksums

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.vms]

def _assert_no_secret_leaked(op: Operator, scenario: Scenario, name: str) -> None:
    texts = {
        "status": yaml.safe_dump(op.status(name)),
        "events": yaml.safe_dump(op.events(name)),
        "operator log": op.process.log_text(),
    }
    for secret in scenario.secret_strings():
        for where, text in texts.items():
            assert secret not in text, f"a secret value appears in the {where}"


@pytest.mark.parametrize("store_kind", ["s3", "azure"])
def test_kubectl_apply_restores_the_cluster(
    store_kind: str,
    operator: Operator,
    healthy_sim_cluster: SimCluster,
    moto_s3: S3Server,
    azurite: AzuriteServer,
) -> None:
    store: S3Server | AzuriteServer = moto_s3 if store_kind == "s3" else azurite
    scenario = Scenario.prepare(healthy_sim_cluster, store, part_size=48 * 1024)
    name = f"restore-{store_kind}"
    ns = operator.namespace
    operator.apply(*scenario.kube_secrets(ns), scenario.manifest(name, ns))
    operator.wait(name, "Succeeded")

    status = operator.status(name)
    assert status["phase"] == "Rejoined"
    assert status["backup"]["id"] == scenario.backup.backup_id
    assert status["backup"]["plainSha256"] == scenario.backup.plain_sha256
    assert status["primary"] == healthy_sim_cluster.primary().name
    assert {n["name"]: n["role"] for n in status["nodes"]}[status["primary"]] == "primary"
    assert all(s["state"] in ("Succeeded", "Skipped") for s in status["steps"])
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Succeeded"]["status"] == "True"
    assert conditions["Stalled"]["status"] == "False"
    assert scenario.restored_everywhere() == {vm.name: True for vm in healthy_sim_cluster.vms}
    assert healthy_sim_cluster.wait_healthy(timeout=30).ok  # agent heartbeat: 3 s

    reasons = [e["reason"] for e in operator.events(name)]
    for phase in ("Decrypting", "Staging", "Restoring", "Rejoined"):
        assert f"Phase{phase}" in reasons
    assert reasons.count("StepFailed") == 0
    assert "Succeeded" in reasons
    # The restore proof: in status (stored by the API server, not pruned), in the final Event,
    # and as rows in the metric.
    proof = status["restoreProof"]
    assert sorted(proof["verifiedOn"]) == sorted(vm.name for vm in healthy_sim_cluster.vms)
    assert proof["rows"] >= 3000
    assert proof["tables"] >= 6
    succeeded = [e["message"] for e in operator.events(name) if e["reason"] == "Succeeded"]
    assert f"restore proven: {proof['rows']} rows in {proof['tables']} tables" in succeeded[0]
    assert "verified on 3 of 3 nodes" in succeeded[0]

    metrics = operator.metrics()
    assert 'pgrecovery_recoveries_total{result="succeeded"} 1.0' in metrics
    assert 'pgrecovery_bytes_total{stage="fetched"}' in metrics
    assert 'pgrecovery_bytes_total{stage="uploaded"}' in metrics
    restored_rows = [line for line in metrics.splitlines()
                     if line.startswith("pgrecovery_restored_rows_total ")]
    assert restored_rows, "pgrecovery_restored_rows_total is not exported"
    assert float(restored_rows[0].split()[1]) >= proof["rows"]
    _assert_no_secret_leaked(operator, scenario, name)

    # GitOps: applying the same manifest again runs nothing again
    started = status["startedAt"]
    operator.apply(scenario.manifest(name, operator.namespace))
    wait_for(lambda: True, timeout=3)
    assert operator.status(name)["startedAt"] == started
    assert operator.status(name)["steps"] == status["steps"]


def test_wrong_key_fails_in_fetching_and_touches_nothing(
    operator: Operator, healthy_sim_cluster: SimCluster, moto_s3: S3Server
) -> None:
    scenario = Scenario.prepare(healthy_sim_cluster, moto_s3, rows=100)
    secrets = scenario.kube_secrets(operator.namespace)
    for secret in secrets:
        if secret["metadata"]["name"] == KEY_SECRET:
            secret["data"][KEY_KEY] = "bm90LXRoZS1rZXk="  # "not-the-key"
    operator.apply(*secrets, scenario.manifest("wrong-key", operator.namespace))
    operator.wait("wrong-key", "Failed", timeout=120)
    status = operator.status("wrong-key")
    assert status["failureReason"] == "WrongKey"
    assert status["facts"]["failedInPhase"] == "Fetching"
    assert "keySecretRef" in status["message"]
    assert not any(s["phase"] in ("Staging", "Restoring", "Rejoined") for s in status["steps"])
    for vm in healthy_sim_cluster.vms:
        monit = vm.monit_status()
        assert monit.get("postgresql-ha") == "OK", (vm.name, monit)
        assert monit.get("repmgr") == "OK", (vm.name, monit)
    assert healthy_sim_cluster.health().ok
    _assert_no_secret_leaked(operator, scenario, "wrong-key")


def test_operator_killed_in_decrypting_and_rejoined_resumes_and_completes(
    operator: Operator, healthy_sim_cluster: SimCluster, moto_s3: S3Server
) -> None:
    scenario = Scenario.prepare(healthy_sim_cluster, moto_s3, rows=20000, part_size=256 * 1024)
    name = "killed-twice"
    ns = operator.namespace
    operator.apply(*scenario.kube_secrets(ns), scenario.manifest(name, ns))
    kills: list[str] = []

    def kill_when(predicate: Callable[[dict[str, Any]], bool], label: str) -> None:
        def seen() -> bool | None:
            return predicate(operator.status(name)) or None

        wait_for(seen, timeout=300, interval=0.1, message=label)
        operator.process.kill()
        kills.append(f"{label}: {operator.status(name).get('phase')}")
        operator.process.start()

    kill_when(lambda s: s.get("phase") == "Decrypting", "in Decrypting")
    kill_when(
        lambda s: any(
            st["name"].startswith("ensure-standbys-recloned") and st["state"] == "Running"
            for st in s.get("steps", [])
        ),
        "during a standby re-clone",
    )
    operator.wait(name, "Succeeded")
    assert len(kills) == 2, kills
    assert scenario.restored_everywhere() == {vm.name: True for vm in healthy_sim_cluster.vms}
    assert healthy_sim_cluster.wait_healthy(timeout=30).ok


def test_dry_run_checks_everything_and_changes_nothing(
    operator: Operator, healthy_sim_cluster: SimCluster, moto_s3: S3Server, tmp_path: Path
) -> None:
    scenario = Scenario.prepare(healthy_sim_cluster, moto_s3, rows=200)
    damaged = {vm.name: table_checksums(vm) for vm in healthy_sim_cluster.vms}
    operator.apply(
        *scenario.kube_secrets(operator.namespace),
        scenario.manifest("dry", operator.namespace, dry_run=True),
    )
    wait_for(
        lambda: (
            {c["type"]: c for c in operator.status("dry").get("conditions", [])}.get(
                "Blocked", {}
            ).get("reason")
            == "DryRunComplete"
            or None
        ),
        timeout=180,
        message="DryRunComplete",
    )
    status = operator.status("dry")
    assert status["phase"] == "Decrypting"
    assert "dry run complete" in status["message"]
    # the report: the backup, the primary, the free space, the verified staged dump
    assert status["backup"]["plainSha256"] == scenario.backup.plain_sha256
    assert status["primary"] == healthy_sim_cluster.primary().name
    assert int(status["facts"]["freeBytesOnPrimary"]) > 0
    assert {vm.name: table_checksums(vm) for vm in healthy_sim_cluster.vms} == damaged
    for vm in healthy_sim_cluster.vms:
        assert vm.monit_status().get("postgresql-ha") == "OK"
    # The verified dump stays staged for a real run; deleting the dry run removes it (and the
    # downloaded parts): nothing of it is left on the VMs or the work volume.
    assert leftover_scan(healthy_sim_cluster, tmp_path / "work",
                         dump_of=scenario.backup.backup_id)
    deleted = operator.kubectl.delete("pgr", "dry", "-n", operator.namespace, "--wait=true",
                                      "--timeout=120s")
    assert deleted.returncode == 0, deleted.stderr
    assert leftover_scan(healthy_sim_cluster, tmp_path / "work",
                         dump_of=scenario.backup.backup_id) == []
    assert "CleanedUp" in {e["reason"] for e in operator.events("dry")}
