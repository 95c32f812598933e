"""Two operator replicas, one recovery: only one executes it; when that one is SIGKILLed in the
middle of the restore, the other takes over after the executor Lease expires and completes it.

Both replicas run standalone (no kopf peering) against the real kube-apiserver
(tests/realkube, the test's own namespace: real optimistic concurrency on the Lease), the worst
case: both receive every event of the PgRecovery and both call its phase handlers. The real
plan restores the simulated 3-VM cluster from a real S3 server. The restore job is held at its
start on the VMs (hold file, `adapters/jobs.py`), so the kill lands while it runs, on any
machine.

Proof that no step ran twice at once: the Lease changed hands exactly once, and not before a
whole lease duration after the executor's last renewal (a live executor renews every third of
it and stops its own work after two thirds without one); the
survivor did no work of the recovery before it took the Lease (its log: no plan line before
its "executes recovery" line); the killed replica did none after the kill (it is dead). Then
the data equals the backup on every node, the cluster is healthy and nothing is left behind.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.operator_harness import CRD, NAMESPACE, Operator, free_port, install_chart
from tests.kubeapi.harness import KopfProcess, Kubectl
from tests.objectstores.servers import S3Server
from tests.realkube.server import RealKubeAPI
from tests.scenario import Scenario, leftover_scan
from tests.simcluster.cluster import SimCluster

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.vms]

NAME = "two-replicas"
LEASE_SECONDS = 6
JOBS_ROOT = "/var/vcap/store/pgrecovery/jobs"
PLAN_LOGGER = "pgrecovery.plans"


def _replica(kube_api: RealKubeAPI, kubectl: Kubectl, make: Callable[..., KopfProcess],
             work: Path, identity: str, namespace: str, kubeconfig: Path, user: str) -> Operator:
    """One replica, under the chart's ServiceAccount token (both pods of a Deployment share it)."""
    port = free_port()
    process = make(
        "pgrecovery.main",
        kubeconfig=kubeconfig,
        user=user,
        env={
            "PGRECOVERY_WORK_DIR": str(work),
            "PGRECOVERY_METRICS_PORT": str(port),
            "PGRECOVERY_POLL_INTERVAL": "0.5",
            "PGRECOVERY_GATE_RECHECK": "0.5",
            "PGRECOVERY_LEASE_DURATION": str(LEASE_SECONDS),
            "PGRECOVERY_EXECUTOR_ID": identity,
        },
        watching=("pgrecoveries",),
    )
    return Operator(kube_api, kubectl, process, port, namespace)


def _lease(api: RealKubeAPI, uid: str, namespace: str) -> dict[str, Any]:
    code, lease = api.request(
        "GET", f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/pgrecovery-{uid}")
    assert code == 200, lease
    spec: dict[str, Any] = lease["spec"]
    return spec


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _plan_lines_before_claim(log: str) -> list[str]:
    """Lines of the recovery's work in a replica's log before it claimed the recovery."""
    before, claimed = [], False
    for line in log.splitlines():
        if "executes recovery" in line:
            claimed = True
        elif not claimed and PLAN_LOGGER in line:
            before.append(line)
    return before


def test_only_one_replica_executes_and_the_other_takes_over_after_a_kill(
    real_kube_api: RealKubeAPI,
    real_kubectl: Kubectl,
    real_kopf_operator: Callable[..., KopfProcess],
    real_namespace: str,
    healthy_sim_cluster: SimCluster,
    moto_s3: S3Server,
    tmp_path: Path,
) -> None:
    kube_api, kubectl, ns = real_kube_api, real_kubectl, real_namespace
    kube_api.install_crd(CRD)
    _, kubeconfig, user = install_chart(kube_api, kubectl, ns)
    work = tmp_path / "work"  # one volume, as two pods would mount one PVC (ReadWriteMany)
    replicas = {
        identity: _replica(kube_api, kubectl, real_kopf_operator, work, identity, ns,
                           kubeconfig, user)
        for identity in ("replica-a", "replica-b")
    }
    scenario = Scenario.prepare(healthy_sim_cluster, moto_s3, rows=2000, part_size=64 * 1024)
    for vm in healthy_sim_cluster.vms:
        vm.run(f"mkdir -p -m 0700 {JOBS_ROOT} && touch {JOBS_ROOT}/hold-restore "
               f"{JOBS_ROOT}/hold-prestore")
    some = next(iter(replicas.values()))
    try:
        some.apply(*scenario.kube_secrets(NAMESPACE), scenario.manifest(NAME, NAMESPACE))
        deadline = time.monotonic() + 240
        while True:
            status = some.status(NAME)
            running = any(s["name"] == "restore-dump" and s["state"] == "Running"
                          for s in status.get("steps", []))
            if running and str((status.get("progress") or {}).get("detail", "")).startswith(
                    "restored"):
                break
            assert status.get("phase") != "Failed", status
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        uid = kubectl.json("pgr", NAME, "-n", ns)["metadata"]["uid"]
        before = _lease(kube_api, uid, ns)
        executor = before["holderIdentity"]
        survivor = "replica-b" if executor == "replica-a" else "replica-a"
        assert executor in replicas, before
        # The other replica has done nothing of the recovery while the executor lived.
        waiting = replicas[survivor].process.log_text()
        assert "executes recovery" not in waiting
        assert PLAN_LOGGER not in waiting

        replicas[executor].process.kill()
        killed_at = time.time()
        # The dead executor's last renewal: nobody may take over before a whole lease
        # duration has passed since then (it would have stopped itself by two thirds of it).
        last_renewal = _epoch(_lease(kube_api, uid, ns)["renewTime"])
    finally:
        for vm in healthy_sim_cluster.vms:
            vm.run(f"rm -f {JOBS_ROOT}/hold-restore {JOBS_ROOT}/hold-prestore")

    other = replicas[survivor]
    other.wait(NAME, "Succeeded", timeout=300)
    after = _lease(kube_api, uid, ns) if kube_api.request(
        "GET", f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/pgrecovery-{uid}"
    )[0] == 200 else None
    log = other.process.log_text()
    report = (f"executor {executor} killed; lease before {before}, after {after}; survivor log "
              f"tail:\n{log[-3000:]}")
    assert "took over the executor lease" in log, report
    assert _plan_lines_before_claim(log) == [], report
    # Released at the end (deleted), or still there with the survivor as holder.
    if after is not None:
        assert after["holderIdentity"] == survivor, report
        assert after["leaseTransitions"] == 1, report
        assert _epoch(after["acquireTime"]) >= last_renewal + LEASE_SECONDS * 0.95, report
    took_over = next(line for line in log.splitlines() if "took over the executor lease" in line)
    took_at = datetime.strptime(took_over[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    assert took_at >= last_renewal + LEASE_SECONDS * 0.95, (
        f"took over at {took_at}, last renewal {last_renewal}, killed at {killed_at}\n{report}")
    status = other.status(NAME)
    assert status["phase"] == "Rejoined", report
    assert not [s for s in status["steps"] if s["state"] == "Failed"], status["steps"]
    assert scenario.restored_everywhere() == {vm.name: True for vm in healthy_sim_cluster.vms}
    assert healthy_sim_cluster.wait_healthy(timeout=30).ok
    assert leftover_scan(healthy_sim_cluster, work, dump_of=scenario.backup.backup_id) == []
    print(f"\n{executor} killed mid-restore; {survivor} took over {took_at - killed_at:.1f} s "
          f"after the kill, {took_at - last_renewal:.1f} s after the last renewal (lease "
          f"{LEASE_SECONDS} s), and completed")
