"""`pgrecovery recover` (local mode, no Kubernetes) on the simulated cluster, for real.

The real CLI runs as a subprocess against the simulated VMs (SSH, PostgreSQL, repmgr, monit)
and a real S3 server, with secrets from a directory. A recovery interrupted by SIGKILL in the
middle of a phase continues with `--resume` and completes; the data equals the backup on every
node afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.objectstores.servers import S3Server
from tests.scenario import Scenario, leftover_scan, local_recover_argv
from tests.simcluster.cluster import SimCluster

pytestmark = [pytest.mark.integration, pytest.mark.vms]

ROOT = Path(__file__).resolve().parents[2]


def _status(path: Path) -> dict[str, object]:
    try:
        return json.loads(path.read_text())["status"]  # type: ignore[no-any-return]
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _run(
    tmp_path: Path,
    scenario: Scenario,
    name: str,
    *,
    new_site: bool = False,
    restore_connections: int | None = None,
) -> tuple[subprocess.CompletedProcess[str], Path]:
    argv, status_file = local_recover_argv(
        scenario, tmp_path, name, new_site=new_site, restore_connections=restore_connections
    )
    result = subprocess.run(
        argv, cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False
    )
    return result, status_file


def test_local_recover_restores_the_backup_on_every_node(
    healthy_sim_cluster: SimCluster, moto_s3: S3Server, tmp_path: Path
) -> None:
    scenario = Scenario.prepare(healthy_sim_cluster, moto_s3, part_size=64 * 1024)
    result, status_file = _run(tmp_path, scenario, "local-full")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "recovery complete" in result.stdout
    status = _status(status_file)
    assert status["phase"] == "Rejoined"
    assert {c["type"]: c["status"] for c in status["conditions"]}["Succeeded"] == "True"  # type: ignore[index]
    assert status["backup"]["id"] == scenario.backup.backup_id  # type: ignore[index]
    assert status["backup"]["plainSha256"] == scenario.backup.plain_sha256  # type: ignore[index]
    facts: dict[str, str] = status["facts"]  # type: ignore[assignment]
    # The sample dump splits: tables copied and indexes built in several sessions.
    assert facts["restoreMode"].startswith("parallel "), facts
    assert "restoredSerially" not in facts
    assert "fetched " in facts["stagedBytes"]
    assert scenario.restored_everywhere() == {vm.name: True for vm in healthy_sim_cluster.vms}
    # The restore proof: every table of the dump counted on every node (the sample's two
    # databases of three tables with 500 rows each, at least), repmgr's tables not verified.
    proof: dict[str, Any] = status["restoreProof"]  # type: ignore[assignment]
    nodes = [vm.name for vm in healthy_sim_cluster.vms]
    assert sorted(proof["verifiedOn"]) == sorted(nodes), proof
    assert proof["verifiedOn"][0] == status["primary"]
    assert proof["nodes"] == len(nodes)
    assert proof["tables"] >= 6
    assert proof["rows"] >= 3000
    assert proof["databases"] >= 2
    assert any(n.startswith("repmgr_cluster.repmgr.*") for n in proof["notVerified"]), proof
    assert set(proof["seconds"]) == set(nodes)
    assert f"restore proven: {proof['rows']} rows in {proof['tables']} tables" in \
        str(status["message"])
    assert "verified on 3 of 3 nodes" in result.stdout
    # Fewer checkpoints while the dump loaded, and the server's own settings back afterwards,
    # on the primary and (through the re-clone) on the standbys.
    assert facts["bulkLoadSettings"] == "reverted", facts
    _assert_checkpoint_settings_original(healthy_sim_cluster)
    assert healthy_sim_cluster.wait_healthy(timeout=30).ok  # agent heartbeat: 3 s
    # Nothing of the recovery is left on the VMs or in the work directory; the status file
    # (the report, no secret in it) stays.
    assert facts["cleanup"].startswith("done; removed "), facts
    assert leftover_scan(healthy_sim_cluster, tmp_path / "work",
                         dump_of=scenario.backup.backup_id) == []
    assert status_file.exists()
    # no secret in what the user saw or what was written down
    for secret in scenario.secret_strings():
        assert secret not in result.stdout + result.stderr
        assert secret not in status_file.read_text()


def _assert_checkpoint_settings_original(cluster: SimCluster) -> None:
    for vm in cluster.vms:
        assert vm.psql("SHOW max_wal_size; SHOW checkpoint_timeout;") == "256MB\n5min", vm.name
        auto_conf = vm.host_path("/var/vcap/store/postgresql15/postgresql.auto.conf")
        assert "max_wal_size" not in auto_conf.read_text(), vm.name
        assert not vm.host_path("/var/vcap/store/pgrecovery/bulk-load-settings").exists()


def test_local_recover_killed_mid_phase_resumes_and_completes(
    healthy_sim_cluster: SimCluster, moto_s3: S3Server, tmp_path: Path
) -> None:
    scenario = Scenario.prepare(healthy_sim_cluster, moto_s3, rows=800, part_size=64 * 1024)
    argv, status_file = local_recover_argv(scenario, tmp_path, "local-resume")
    proc = subprocess.Popen(
        argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 600
    killed_in = None
    while time.monotonic() < deadline and proc.poll() is None:
        phase = _status(status_file).get("phase")
        if phase == "Staging":
            os.killpg(proc.pid, signal.SIGKILL)
            killed_in = phase
            break
        time.sleep(0.2)
    proc.wait(timeout=30)
    assert killed_in == "Staging", f"did not reach Staging: {_status(status_file)}"
    resumed = subprocess.run(
        [*argv, "--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    status = _status(status_file)
    assert status["phase"] == "Rejoined"
    assert scenario.restored_everywhere() == {vm.name: True for vm in healthy_sim_cluster.vms}
    assert healthy_sim_cluster.wait_healthy(timeout=30).ok  # agent heartbeat: 3 s


def _run_recover(
    tmp_path: Path,
    scenario: Scenario,
    name: str,
    *,
    new_site: bool = False,
    restore_connections: int | None = None,
) -> tuple[subprocess.CompletedProcess[str], dict[str, object]]:
    result, status_file = _run(
        tmp_path, scenario, name, new_site=new_site, restore_connections=restore_connections
    )
    return result, _status(status_file)


def test_new_site_recovery_applies_the_site_roles(
    healthy_sim_cluster: SimCluster, moto_s3: S3Server, tmp_path: Path
) -> None:
    """The backup carries another site's repmgr password; with newSite the site's own
    create_or_update_roles_and_databases.sql wins, so repmgr (and the re-clones) work."""
    cluster = healthy_sim_cluster
    site_password = cluster.repmgr_password

    def old_site_password(c: SimCluster) -> None:
        c.primary().psql("ALTER ROLE repmgr PASSWORD 'the-old-site-password'")

    def back_to_site_password(c: SimCluster) -> None:
        c.primary().psql(f"ALTER ROLE repmgr PASSWORD '{site_password}'")

    scenario = Scenario.prepare(
        cluster,
        moto_s3,
        rows=200,
        before_backup=old_site_password,
        after_backup=back_to_site_password,
    )
    # One session, as in the runbook: the serial restore stays covered end to end.
    result, status = _run_recover(
        tmp_path, scenario, "new-site", new_site=True, restore_connections=1
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert status["facts"]["restoreMode"] == (  # type: ignore[index]
        "serial: spec.parallelism.restoreConnections is 1"
    )
    steps = {s["name"]: s["state"] for s in status["steps"]}  # type: ignore[union-attr]
    assert steps["apply-site-roles"] == "Succeeded"
    assert scenario.restored_everywhere() == {vm.name: True for vm in cluster.vms}
    # the site's password (not the dump's) lets repmgr log in over the network
    login = cluster.primary().run(
        [
            "bash",
            "-c",
            f"PGPASSWORD={site_password} psql -h {cluster.primary().address} "
            "-U repmgr -d repmgr_cluster -tAc 'select 1'",
        ],
        check=False,
    )
    assert login.returncode == 0, login
    assert cluster.wait_healthy(timeout=30).ok  # the agent reports every 3 s


_OWNED_IN_POSTGRES = "public.pgr_owned_by_app_role"


def _role_owns_an_object_in_postgres(cluster: SimCluster) -> None:
    cluster.primary().psql(f"CREATE TABLE {_OWNED_IN_POSTGRES} (id int); "
                           f"ALTER TABLE {_OWNED_IN_POSTGRES} OWNER TO shop_owner;")


@pytest.mark.parametrize("sessions", [None, 1], ids=["parallel", "serial"])
def test_restore_error_fails_restoring_with_the_error_text_and_state(
    healthy_sim_cluster: SimCluster, moto_s3: S3Server, tmp_path: Path, sessions: int | None
) -> None:
    """psql prints an error that is not on the expected list (and exits 0); pgrecovery must
    fail Restoring with that text, never report success — with the parallel restore as with
    one psql. The real cause here: after the backup, the application role came to own an
    object in `postgres`, so the dump's `DROP ROLE` (pg_dumpall --clean) fails. (A dump without
    --clean over databases that hold objects no longer gets this far: it is refused in
    Decrypting, tests/integration/test_existing_databases.py.)"""
    scenario = Scenario.prepare(healthy_sim_cluster, moto_s3, rows=100,
                                after_backup=_role_owns_an_object_in_postgres)
    try:
        result, status = _run_recover(
            tmp_path, scenario, "no-clean", restore_connections=sessions
        )
        # What the failed run keeps is listed in its status; `pgrecovery cleanup` removes it.
        listed = str(status["facts"]["leftovers"])  # type: ignore[index]
        assert f"{scenario.backup.backup_id}.dump (" in listed, listed
        assert leftover_scan(healthy_sim_cluster, tmp_path / "work",
                         dump_of=scenario.backup.backup_id)
        argv, status_file = local_recover_argv(scenario, tmp_path, "no-clean")
        argv[argv.index("recover")] = "cleanup"
        cleanup = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True,
                                 timeout=300, check=False)
        assert cleanup.returncode == 0, cleanup.stdout + cleanup.stderr
        assert "cleanup done: " in cleanup.stdout, cleanup.stdout
        assert leftover_scan(healthy_sim_cluster, tmp_path / "work",
                         dump_of=scenario.backup.backup_id) == []
        assert status_file.exists()
    finally:
        # The failed recovery leaves standbys stopped and connections blocked, as it must;
        # put the shared cluster back for the tests after this one.
        healthy_sim_cluster.heal(timeout=30)
        healthy_sim_cluster.primary().psql(f"DROP TABLE IF EXISTS {_OWNED_IN_POSTGRES}")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "recovery FAILED (RestoreFailed)" in result.stdout
    assert status["phase"] == "Failed"
    assert status["failureReason"] == "RestoreFailed"
    assert 'role "shop_owner" cannot be dropped because some objects depend on it' in str(
        status["message"]
    ), status["message"]
    assert status["facts"]["dumpDropsDatabases"].startswith("yes"), status["facts"]  # type: ignore[index]
    assert status["facts"]["failedInPhase"] == "Restoring"  # type: ignore[index]
    steps = {s["name"]: s["state"] for s in status["steps"]}  # type: ignore[union-attr]
    # the cluster's state is in status: what ran (standbys stopped, connections blocked)
    assert steps["ensure-standbys-stopped"] == "Succeeded"
    assert steps["ensure-connections-blocked"] == "Succeeded"
    assert steps["restore-dump"] == "Failed"
    assert not any(name.startswith("ensure-standbys-recloned") for name in steps)
    # The checkpoint settings raised for the restore were put back when it failed.
    assert status["facts"]["bulkLoadSettings"] == "reverted after the failed restore"  # type: ignore[index]
    primary = healthy_sim_cluster.primary()
    assert primary.psql("SHOW max_wal_size;") == "256MB"
    assert not primary.host_path("/var/vcap/store/pgrecovery/bulk-load-settings").exists()
