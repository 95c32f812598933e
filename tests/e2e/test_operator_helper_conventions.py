"""The operator (a real `kopf run` with the real plan) recovers a cluster whose helper
functions drop privileges themselves — the convention that broke a recovery in Rejoined on a
cluster built by other hands (issue 15). The other convention (helpers called as postgres) is
the session cluster of `test_operator_recovery.py`.
"""

from __future__ import annotations

import pytest

from tests.e2e.operator_harness import NAMESPACE, Operator
from tests.objectstores.servers import S3Server
from tests.scenario import Scenario
from tests.simcluster.cluster import SimCluster

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.vms]


def test_operator_recovers_a_cluster_whose_helpers_drop_privileges(
    operator: Operator, self_dropping_sim_cluster: SimCluster, moto_s3: S3Server
) -> None:
    cluster = self_dropping_sim_cluster
    cluster.heal(timeout=30)
    scenario = Scenario.prepare(cluster, moto_s3, rows=300, part_size=48 * 1024)
    name = "helpers-drop-privileges"
    operator.apply(*scenario.kube_secrets(NAMESPACE), scenario.manifest(name, NAMESPACE))
    operator.wait(name, "Succeeded")
    status = operator.status(name)
    assert status["phase"] == "Rejoined"
    facts = status["facts"]
    assert facts["helperConvention"] == "helper-drops-privileges", facts
    assert "called as root" in facts["registerPrimaryVia"]
    steps = [s["name"] for s in status["steps"]]
    assert steps.index("check-cluster-tools") == steps.index("probe-cluster") + 1
    assert all(s["state"] in ("Succeeded", "Skipped") for s in status["steps"])
    assert scenario.restored_everywhere() == {vm.name: True for vm in cluster.vms}
    assert cluster.wait_healthy(timeout=30).ok


def test_operator_fails_in_fetching_on_a_missing_clone_entry_point(
    operator: Operator, healthy_sim_cluster: SimCluster, moto_s3: S3Server
) -> None:
    """pg/2's pre-start renamed: Failed in Fetching with ClusterToolsMismatch naming node and
    path (status, condition, Warning event, metric), nothing stopped anywhere."""
    cluster = healthy_sim_cluster
    scenario = Scenario.prepare(cluster, moto_s3, rows=50)
    pre_start = cluster.vm("pg/2").host_path("/var/vcap/jobs/postgresql-ha/bin/pre-start")
    name = "tools-mismatch"
    pre_start.rename(pre_start.with_name("pre-start.renamed"))
    try:
        operator.apply(*scenario.kube_secrets(NAMESPACE), scenario.manifest(name, NAMESPACE))
        operator.wait(name, "Failed", timeout=120)
        monit = {vm.name: vm.monit_status() for vm in cluster.vms}
    finally:
        pre_start.with_name("pre-start.renamed").rename(pre_start)
    status = operator.status(name)
    assert status["failureReason"] == "ClusterToolsMismatch"
    assert status["facts"]["failedInPhase"] == "Fetching"
    assert "pg/2: /var/vcap/jobs/postgresql-ha/bin/pre-start is missing" in status["message"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Failed"]["reason"] == "ClusterToolsMismatch"
    assert "ClusterToolsMismatch" in [e["reason"] for e in operator.events(name)]
    assert 'pgrecovery_failures_total{reason="ClusterToolsMismatch"} 1.0' in operator.metrics()
    assert not any(s["phase"] in ("Staging", "Restoring", "Rejoined") for s in status["steps"])
    assert all(m.get("postgresql-ha") == "OK" and m.get("repmgr") == "OK"
               for m in monit.values()), monit
    assert cluster.health().ok
