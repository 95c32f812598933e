"""Nothing of a recovery stays behind: after success, after a failure and a deletion, and after
a deletion in the middle of the restore — and a new PgRecovery repairs what a deleted one left.

The real operator (`kopf run`, the real a9s plan) against the simulated 3-VM cluster and a real
S3 server. After each case a scan of every VM (`find` under `/var/vcap/store`: pgrecovery's
state directory with jobs, journal and restore work, clone markers, staged dumps) and of the
operator's work volume is printed and asserted. Deletion runs through the finalizer: remote work
is stopped (the restore job, held on the primary by a hold file so the deletion lands while it
runs), the files removed, then the object goes.

What deletion deliberately keeps: the original `pg_hba.conf` beside the blocked one on a
half-restored primary (it must not take application writes; the next run puts the original
back). The scan allows exactly that file and nothing else.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.operator_harness import NAMESPACE, Operator
from tests.objectstores.servers import S3Server
from tests.scenario import (
    Scenario,
    drop_the_object_owned_in_postgres,
    leftover_scan,
    role_owns_an_object_in_postgres,
)
from tests.simcluster.cluster import SimCluster

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.vms]

JOBS_ROOT = "/var/vcap/store/pgrecovery/jobs"
HBA_ORIGINAL = "pg_hba.conf.pgrecovery-orig"


def _delete(op: Operator, name: str, timeout: int = 180) -> float:
    started = time.monotonic()
    result = op.kubectl.delete("pgr", name, "-n", op.namespace, "--wait=true",
                               f"--timeout={timeout}s")
    assert result.returncode == 0, f"{result.stderr}\n{op.process.log_text()[-4000:]}"
    gone = op.kubectl.get("pgr", name, "-n", op.namespace)
    assert gone.returncode != 0, gone.stdout
    assert "NotFound" in gone.stderr, gone.stderr
    return time.monotonic() - started


def _reasons(events: list[dict[str, Any]]) -> dict[str, str]:
    return {e["reason"]: e["message"] for e in events}


def _wait_status(op: Operator, name: str, seen: Callable[[dict[str, Any]], bool],
                 timeout: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status = op.status(name)
        if seen(status):
            return status
        assert time.monotonic() < deadline, f"{status}\n{op.process.log_text()[-4000:]}"
        time.sleep(0.2)


def test_success_leaves_nothing_on_the_vms_or_the_work_volume(
    operator: Operator, healthy_sim_cluster: SimCluster, moto_s3: S3Server, tmp_path: Path
) -> None:
    """Also: restoring a backup older than the newest one warns of ghost deployments (the a9s
    runbook's "Limitations"), in a condition and a Warning Event."""
    scenario = Scenario.prepare(healthy_sim_cluster, moto_s3, part_size=64 * 1024)
    # A newer backup of the same GUID, two hours later (its first part is enough to list it).
    newer = f"{scenario.backup.guid}-{scenario.backup.timestamp_ms + 2 * 3600 * 1000}"
    moto_s3.client().put_object(Bucket=scenario.backup.bucket, Key=f"{newer}-0",
                                Body=b"Salted__" + bytes(24))
    manifest = scenario.manifest("clean-ok", NAMESPACE)
    manifest["spec"]["source"]["backupId"] = scenario.backup.backup_id
    operator.apply(*scenario.kube_secrets(NAMESPACE), manifest)
    operator.wait("clean-ok", "Succeeded")
    status = operator.status("clean-ok")
    ghost = next(c for c in status["conditions"] if c["type"] == "GhostDeploymentsPossible")
    assert ghost["status"] == "True", ghost
    assert f"2.0 h older than the newest backup {newer}" in ghost["message"], ghost
    warnings = [e for e in operator.events("clean-ok")
                if e["reason"] == "GhostDeploymentsPossible"]
    assert len(warnings) == 1, warnings
    assert warnings[0]["type"] == "Warning"
    scan = leftover_scan(healthy_sim_cluster, tmp_path / "work",
                         dump_of=scenario.backup.backup_id)
    print("scan after success:", scan or "nothing")
    assert scan == []
    assert status["facts"]["cleanup"].startswith("done; removed "), status["facts"]
    assert scenario.restored_everywhere() == {vm.name: True for vm in healthy_sim_cluster.vms}
    # Deleting a completed recovery finds nothing more to remove and goes at once.
    _delete(operator, "clean-ok")


def test_failure_lists_what_it_keeps_and_deletion_leaves_it_to_the_run_that_uses_it(
    operator: Operator, healthy_sim_cluster: SimCluster, moto_s3: S3Server, tmp_path: Path
) -> None:
    """A failed recovery keeps its files (listed in status) for the next run. When it is
    deleted while that next run is working with them (it re-used the staged dump), they stay
    for it (Event LeftoversHandedOver) instead of being removed under it; its success then
    removes everything. (A deletion with nobody to leave them to removes them: the next test.)"""
    # A restore error (DROP ROLE of a role that owns a table made after the backup): fails in
    # Restoring, after the destructive steps, with the staged dump and the job records on the
    # VMs. (A dump without --clean over existing data no longer gets this far: DatabasesExist.)
    scenario = Scenario.prepare(healthy_sim_cluster, moto_s3, rows=100,
                                after_backup=role_owns_an_object_in_postgres)
    dump = f"/var/vcap/store/postgresql-restore/{scenario.backup.backup_id}.dump"
    primary = healthy_sim_cluster.primary()
    try:
        operator.apply(*scenario.kube_secrets(NAMESPACE),
                       scenario.manifest("clean-failed", NAMESPACE))
        operator.wait("clean-failed", "Failed")
        status = operator.status("clean-failed")
        assert status["failureReason"] == "RestoreFailed", status
        listed = status["facts"]["leftovers"]
        print("leftovers listed in status:", listed)
        assert f"{dump} (" in listed, listed
        assert "/var/vcap/store/pgrecovery/jobs" in listed, listed
        assert "operator:" in listed, listed  # the downloaded parts
        assert leftover_scan(healthy_sim_cluster, tmp_path / "work",
                             dump_of=scenario.backup.backup_id)

        # The next run of the deployment, held at the start of its restore job on the VM.
        drop_the_object_owned_in_postgres(healthy_sim_cluster)
        for vm in healthy_sim_cluster.vms:
            vm.run(f"mkdir -p -m 0700 {JOBS_ROOT} && touch {JOBS_ROOT}/hold-restore "
                   f"{JOBS_ROOT}/hold-prestore")
        operator.apply(scenario.manifest("clean-next", NAMESPACE))
        _wait_status(operator, "clean-next", lambda s: any(
            st["name"] == "restore-dump" and st["state"] == "Running"
            for st in s.get("steps", [])))
        assert operator.status("clean-next")["facts"]["stagedDumpReuse"].startswith(
            f"re-used: {dump}"), operator.status("clean-next")["facts"]

        seconds = _delete(operator, "clean-failed")
        reasons = _reasons(operator.events("clean-failed"))
        print(f"deleted in {seconds:.1f} s:", reasons.get("LeftoversHandedOver"))
        assert "CleanedUp" not in reasons, reasons
        handed = reasons["LeftoversHandedOver"]
        inheritor = f"PgRecovery {operator.namespace}/clean-next of the same deployment"
        assert inheritor in handed, handed
        assert "removed: operator:" in handed, handed  # its own work directory
        assert primary.run(["test", "-f", dump], check=False).returncode == 0
        jobs = primary.run(f"ls {JOBS_ROOT}").stdout.split()
        assert any(j.startswith(("restore-", "prestore-")) for j in jobs), jobs
    finally:
        for vm in healthy_sim_cluster.vms:
            vm.run(f"rm -f {JOBS_ROOT}/hold-restore {JOBS_ROOT}/hold-prestore")
        drop_the_object_owned_in_postgres(healthy_sim_cluster)
    try:
        operator.wait("clean-next", "Succeeded")
        assert scenario.restored_everywhere() == {vm.name: True
                                                  for vm in healthy_sim_cluster.vms}
        scan = leftover_scan(healthy_sim_cluster, tmp_path / "work",
                             dump_of=scenario.backup.backup_id)
        print("scan after the next run succeeded:", scan or "nothing")
        assert scan == []
    finally:
        healthy_sim_cluster.heal(timeout=30)


def test_deletion_mid_restore_stops_the_job_cleans_up_and_a_new_recovery_repairs(
    operator: Operator, healthy_sim_cluster: SimCluster, moto_s3: S3Server, tmp_path: Path
) -> None:
    scenario = Scenario.prepare(healthy_sim_cluster, moto_s3, rows=2000, part_size=64 * 1024)
    # The restore job waits at its start on the VM while these files exist: the deletion
    # lands while it runs, on any machine.
    for vm in healthy_sim_cluster.vms:
        vm.run(f"mkdir -p -m 0700 {JOBS_ROOT} && touch {JOBS_ROOT}/hold-restore "
               f"{JOBS_ROOT}/hold-prestore")
    try:
        operator.apply(*scenario.kube_secrets(NAMESPACE),
                       scenario.manifest("clean-deleted", NAMESPACE))
        _wait_status(operator, "clean-deleted", lambda s: any(
            st["name"] == "restore-dump" and st["state"] == "Running" for st in s.get("steps", [])
        ) and str((s.get("progress") or {}).get("detail", "")).startswith("restored"))
        primary = healthy_sim_cluster.primary()
        running = primary.run(f"ls {JOBS_ROOT}").stdout.split()
        assert any(j.startswith(("restore-", "prestore-")) for j in running), running

        seconds = _delete(operator, "clean-deleted")
        scan = leftover_scan(healthy_sim_cluster, tmp_path / "work",
                         dump_of=scenario.backup.backup_id)
        print(f"scan after a deletion mid-restore ({seconds:.1f} s):", scan or "nothing")
        assert [s for s in scan if not s.endswith(HBA_ORIGINAL)] == []
        # The job is gone with its process; the checkpoint settings are the server's again.
        assert primary.run("pgrep -x psql || true").stdout.strip() == ""
        assert primary.psql("SHOW max_wal_size;") == "256MB"
        reasons = _reasons(operator.events("clean-deleted"))
        assert "Deleted" in reasons, reasons
        assert "CleanedUp" in reasons, reasons
        assert "NOT reverted" not in reasons["CleanedUp"], reasons["CleanedUp"]
    finally:
        for vm in healthy_sim_cluster.vms:
            vm.run(f"rm -f {JOBS_ROOT}/hold-restore {JOBS_ROOT}/hold-prestore")

    # A new PgRecovery for the deployment continues from the half-restored cluster.
    operator.apply(scenario.manifest("clean-again", NAMESPACE))
    operator.wait("clean-again", "Succeeded")
    # The newest backup was restored: no ghost-deployment warning.
    assert not [c for c in operator.status("clean-again")["conditions"]
                if c["type"] == "GhostDeploymentsPossible"]
    assert scenario.restored_everywhere() == {vm.name: True for vm in healthy_sim_cluster.vms}
    assert healthy_sim_cluster.wait_healthy(timeout=30).ok
    scan = leftover_scan(healthy_sim_cluster, tmp_path / "work",
                         dump_of=scenario.backup.backup_id)
    print("scan after the new recovery:", scan or "nothing")
    assert scan == []
