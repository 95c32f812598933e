"""Dumps without `--clean` and re-using a staged dump, for real (local mode, simulated cluster).

* A `pg_dumpall` made without `--clean` over a cluster that still holds its databases is
  refused in Decrypting (`DatabasesExist`, the databases named), with nothing changed on any
  node; the same recovery with `spec.restore.replaceExistingDatabases` then drops and lets the
  dump recreate them, reaches Rejoined with the data equal on every node — and re-uses the dump
  the refused run left staged: the backup in the store is damaged in between (same sizes), so
  streaming it again would have failed.
* Killed (SIGKILL) right after the databases were dropped, before the restore started, the
  replacing run resumes (`--resume`) and completes without dropping anything again.
* A staged dump whose bytes changed on the VM is not re-used: it is staged again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from botocore.config import Config

from tests.e2e.test_bad_input_matrix import _cluster_state, _untouched
from tests.objectstores.servers import S3Server
from tests.scenario import Scenario, leftover_scan
from tests.simcluster.cluster import SimCluster

pytestmark = [pytest.mark.integration, pytest.mark.vms]

RESTORE_DIR = "/var/vcap/store/postgresql-restore"
DESTRUCTIVE = ("Staging", "Restoring", "Rejoined")


def _argv(scenario: Scenario, directory: Path, name: str,
          **spec: Any) -> tuple[list[str], Path]:
    directory.mkdir(parents=True, exist_ok=True)
    doc = scenario.manifest(name)
    doc["spec"].update(spec)
    manifest = directory / f"{name}.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    secrets = scenario.write_secrets_dir(directory / "secrets")
    status_file = directory / f"{name}.status.json"
    argv = [sys.executable, "-m", "pgrecovery.cli", "recover", "-f", str(manifest),
            "--secrets-dir", str(secrets), "--status-file", str(status_file),
            "--work-dir", str(directory / "work")]
    return argv, status_file


def _status(status_file: Path) -> dict[str, Any]:
    return json.loads(status_file.read_text())["status"] if status_file.exists() else {}


def _recover(scenario: Scenario, directory: Path, name: str,
             **spec: Any) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """`pgrecovery recover` of the scenario's manifest with `spec` merged in, in its own
    directory (own work directory: a stream would have to fetch every part)."""
    argv, status_file = _argv(scenario, directory, name, **spec)
    result = subprocess.run(argv, cwd=directory, capture_output=True, text=True, timeout=900,
                            check=False)
    return result, _status(status_file)


def _s3(store: S3Server) -> Any:
    return boto3.client("s3", endpoint_url=store.endpoint_url,
                        aws_access_key_id=store.access_key,
                        aws_secret_access_key=store.secret_key,
                        region_name=store.region or "us-east-1",
                        config=Config(s3={"addressing_style": "path"}))


def _damage_last_part(scenario: Scenario, store: S3Server) -> None:
    """Flip a byte in the middle of the last part (same size: Fetching's checks pass, but any
    stream of the backup fails its gzip check)."""
    s3 = _s3(store)
    key = scenario.backup.part_keys[-1]
    body = bytearray(s3.get_object(Bucket=scenario.backup.bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0x5A
    s3.put_object(Bucket=scenario.backup.bucket, Key=key, Body=bytes(body))


def test_a_dump_without_clean_is_refused_then_replaced_re_using_the_staged_dump(
    healthy_sim_cluster: SimCluster, moto_s3: S3Server, tmp_path: Path
) -> None:
    cluster = healthy_sim_cluster
    scenario = Scenario.prepare(cluster, moto_s3, rows=150, part_size=16 * 1024,
                                dumpall_args=())
    backup_id = scenario.backup.backup_id
    before = _cluster_state(cluster)

    refused, status = _recover(scenario, tmp_path / "refused", "no-clean")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "recovery FAILED (DatabasesExist)" in refused.stdout
    assert status["failureReason"] == "DatabasesExist"
    facts = status["facts"]
    assert facts["failedInPhase"] == "Decrypting"
    message = status["message"]
    for text in ("without pg_dumpall --clean", "shop (", "crm (", "Nothing was changed",
                 "spec.restore.replaceExistingDatabases"):
        assert text in message, message
    assert facts["dumpDropsDatabases"].startswith("no (pg_dumpall without --clean)"), facts
    assert "shop (" in facts["databaseCollisions"]
    assert "crm (" in facts["databaseCollisions"]
    assert "restored over by design: repmgr_cluster" in facts["databaseCollisions"]
    assert not [s["name"] for s in status["steps"] if s["phase"] in DESTRUCTIVE]
    # Nothing changed on any node; the staging directory holds the verified dump and its
    # marker, listed as what the failed run keeps for the next one.
    after = _cluster_state(cluster)
    problems = _untouched(before, after)
    kept = {f"{backup_id}.dump", f"{backup_id}.dump.sha256", f"{backup_id}.dump.pgrecovery.json"}
    assert problems == [f"{cluster.primary().name}: left in {RESTORE_DIR}: {sorted(kept)}"], \
        problems
    for name in kept:
        assert f"{RESTORE_DIR}/{name} (" in facts["leftovers"], facts["leftovers"]

    _damage_last_part(scenario, moto_s3)
    try:
        replaced, status = _recover(scenario, tmp_path / "replaced", "no-clean-replace",
                                    restore={"replaceExistingDatabases": True})
    finally:
        cluster.heal(timeout=60)
    assert replaced.returncode == 0, replaced.stdout + replaced.stderr
    assert status["phase"] == "Rejoined"
    facts = status["facts"]
    # Not streamed again: the damaged store would have failed the stream (BackupCorrupt).
    assert facts["stagedDumpReuse"].startswith(f"re-used: {RESTORE_DIR}/{backup_id}.dump"), facts
    assert "verified on the VM" in facts["stagedDumpReuse"]
    assert facts["stagedBytes"].startswith("re-used ")
    assert "fetched 0" in facts["stagedBytes"]
    assert "re-used the dump staged on" in replaced.stdout, replaced.stdout
    replace = json.loads(facts["databasesToReplace"])
    assert {"shop", "crm", "repmgr_cluster"} <= set(replace), replace
    assert not {"postgres", "template0", "template1"} & set(replace)
    steps = {s["name"]: s["state"] for s in status["steps"]}
    assert steps["ensure-databases-replaced"] == "Succeeded"
    assert scenario.restored_everywhere() == {vm.name: True for vm in cluster.vms}
    assert cluster.wait_healthy(timeout=30).ok
    assert leftover_scan(cluster, tmp_path / "replaced" / "work", dump_of=backup_id) == []


def test_replacing_killed_after_the_drops_resumes_and_completes(
    healthy_sim_cluster: SimCluster, moto_s3: S3Server, tmp_path: Path
) -> None:
    cluster = healthy_sim_cluster
    scenario = Scenario.prepare(cluster, moto_s3, rows=150, dumpall_args=())
    argv, status_file = _argv(scenario, tmp_path, "replace-killed",
                              restore={"replaceExistingDatabases": True})
    breakpoints = tmp_path / "breakpoints"
    breakpoints.mkdir()
    (breakpoints / "before-restore-dump.hold").touch()
    env = {**os.environ, "PGRECOVERY_BREAKPOINT_DIR": str(breakpoints)}
    try:
        with subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) as proc:
            deadline = time.monotonic() + 300
            while not (breakpoints / "before-restore-dump.reached").exists():
                assert proc.poll() is None, proc.communicate()[0][-3000:]
                assert time.monotonic() < deadline, "never reached restore-dump"
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=30)
        killed = _status(status_file)
        assert killed["facts"]["databasesReplaced"], killed["facts"]
        # Dropped, not yet created again.
        have = set(cluster.primary().psql("SELECT datname FROM pg_database").split())
        assert not {"shop", "crm"} & have, have
        resumed = subprocess.run([*argv, "--resume"], cwd=tmp_path, capture_output=True,
                                 text=True, timeout=900, check=False)
    finally:
        cluster.heal(timeout=60)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    status = _status(status_file)
    assert status["phase"] == "Rejoined"
    assert status["facts"]["databasesReplaced"] == killed["facts"]["databasesReplaced"]
    assert scenario.restored_everywhere() == {vm.name: True for vm in cluster.vms}


def test_a_staged_dump_that_changed_on_the_vm_is_staged_again(
    healthy_sim_cluster: SimCluster, moto_s3: S3Server, tmp_path: Path
) -> None:
    cluster = healthy_sim_cluster
    scenario = Scenario.prepare(cluster, moto_s3, rows=150, part_size=16 * 1024)
    backup_id = scenario.backup.backup_id
    # A dry run stages and verifies the dump, and keeps it (with its marker) for the next run.
    dry, status = _recover(scenario, tmp_path / "dry", "dry", dryRun=True)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "stagedDumpReuse" not in status["facts"]
    dump = f"{RESTORE_DIR}/{backup_id}.dump"
    primary = cluster.primary()
    size = int(primary.run(["stat", "-c", "%s", dump]).stdout)
    # One byte changed in place: same size, another sha256.
    primary.run(["bash", "-c", f"printf X | dd of={dump} bs=1 seek={size // 2} conv=notrunc "
                               "status=none"])
    try:
        result, status = _recover(scenario, tmp_path / "run", "after-change")
    finally:
        cluster.heal(timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    facts = status["facts"]
    assert facts["stagedDumpReuse"].startswith("not re-used: its sha256 on the VM is "), facts
    assert facts["stagedDumpReuse"].endswith("staged again"), facts
    assert facts["stagedBytes"].startswith("fetched "), facts
    assert not facts["stagedBytes"].startswith("fetched 0,"), facts
    assert status["backup"]["plainSha256"] == scenario.backup.plain_sha256
    assert scenario.restored_everywhere() == {vm.name: True for vm in cluster.vms}
    assert leftover_scan(cluster, tmp_path / "run" / "work", dump_of=backup_id) == []
