"""Point-in-time recovery from a WAL-E archive onto the simulated a9s-pg cluster, for real.

The archive is written by the cluster itself (H4's world: PostgreSQL's archive_command in the
VMs pushes lzop'd WAL to S3, base backups from pg_basebackup in WAL-E's layout). The real CLI
(`pgrecovery recover`, local mode) restores it through SSH onto the primary, replays to the
target and rejoins the standbys. Checked on every node afterwards.

Bad archives (corrupt lzop block, missing segment, foreign sysid) and a target beyond the
archive must fail in Fetching with the cluster untouched: monit all running, data unchanged.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.boshdirector.director import DirectorEmulator
from tests.boshdirector.fixtures import CLIENT_ID, cli_environment
from tests.simcluster.cluster import SimCluster
from tests.simcluster.config import PG_BINDIR
from tests.simcluster.data import wait_for_replay
from tests.wale import faults
from tests.wale.simarchive import WaleArchive

pytestmark = [pytest.mark.integration, pytest.mark.vms]

S3_SECRET = "wale-store"
SSH_SECRET = "a9s-pg-ssh"


def _manifest(archive: WaleArchive, name: str, target: datetime | None,
              best_effort: bool = False, dry_run: bool = False) -> dict[str, Any]:
    cluster = archive.cluster
    spec: dict[str, Any] = {
        "source": {
            "type": "walE",
            "backupGuid": archive.service_guid,
            "s3": {
                "bucket": archive.target.bucket,
                "region": archive.target.region,
                "endpoint": archive.target.endpoint_url,
                "credentialsSecretRef": {"name": S3_SECRET},
            },
        },
        "target": {
            "type": "a9sPg",
            "deployment": "a9s-pg",
            "nodes": cluster.nodes_spec(),
            "ssh": {
                "user": cluster.ssh_user,
                "privateKeySecretRef": {"name": SSH_SECRET, "key": "id_ed25519"},
                "knownHostsSecretRef": {"name": SSH_SECRET, "key": "known_hosts"},
            },
            "postgresMajorVersion": 15,
        },
        "confirm": "a9s-pg",
        "dryRun": dry_run,
    }
    if target is not None:
        spec["pointInTime"] = {"targetTime": target.isoformat(), "bestEffort": best_effort}
    return {"apiVersion": "pgrecovery.dev/v1alpha1", "kind": "PgRecovery",
            "metadata": {"name": name, "namespace": "pgrecovery"}, "spec": spec}


def _recover(tmp_path: Path, archive: WaleArchive, name: str, target: datetime | None,
             best_effort: bool = False, dry_run: bool = False,
             ) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    argv, status_file = _argv(tmp_path, archive, name, target, best_effort, dry_run)
    result = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=1200,
                            check=False)
    return result, _status(status_file)


def _status(status_file: Path) -> dict[str, Any]:
    try:
        return json.loads(status_file.read_text())["status"]  # type: ignore[no-any-return]
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _argv(tmp_path: Path, archive: WaleArchive, name: str, target: datetime | None,
          best_effort: bool = False, dry_run: bool = False) -> tuple[list[str], Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    manifest = tmp_path / f"{name}.yaml"
    manifest.write_text(yaml.safe_dump(_manifest(archive, name, target, best_effort, dry_run)))
    secrets = tmp_path / "secrets"
    values = {
        S3_SECRET: {"AWS_ACCESS_KEY_ID": archive.target.access_key.encode(),
                    "AWS_SECRET_ACCESS_KEY": archive.target.secret_key.encode()},
        SSH_SECRET: {"id_ed25519": archive.cluster.client_key_path.read_bytes(),
                     "known_hosts": archive.cluster.known_hosts.encode()},
    }
    for secret, keys in values.items():
        (secrets / secret).mkdir(parents=True, exist_ok=True, mode=0o700)
        for key, value in keys.items():
            (secrets / secret / key).write_bytes(value)
            (secrets / secret / key).chmod(0o600)
    status_file = tmp_path / f"{name}.status.json"
    argv = [sys.executable, "-m", "pgrecovery.cli", "recover", "-f", str(manifest),
            "--secrets-dir", str(secrets), "--status-file", str(status_file),
            "--work-dir", str(tmp_path / "work")]
    return argv, status_file


def _vm_time(archive: WaleArchive) -> datetime:
    text = archive.primary.psql("SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', "
                                "'YYYY-MM-DD\"T\"HH24:MI:SS.US')")
    return datetime.fromisoformat(text.strip()).replace(tzinfo=UTC)


def _write_a_then_b(archive: WaleArchive) -> tuple[datetime, datetime]:
    """Row A committed (its segment closed and archived), a pause, row B committed, WAL
    switched and archived.
    Returns (a time between A and B, B's commit time or later)."""
    time.sleep(1.5)  # the base backup's STOP TIME (whole seconds) + 1 s must lie before A
    primary = archive.primary
    # An earlier test's recovery may have left the table: start empty (after the backup).
    primary.psql("DROP TABLE IF EXISTS public.pitr_marks")
    primary.psql("CREATE TABLE public.pitr_marks (mark text PRIMARY KEY)")
    primary.psql("INSERT INTO public.pitr_marks VALUES ('A')")
    # A and B in different segments: a damaged A segment then lies inside the needed range.
    archive.switch_wal()
    time.sleep(1.0)
    between = _vm_time(archive)
    time.sleep(1.0)
    primary.psql("INSERT INTO public.pitr_marks VALUES ('B')")
    after_b = _vm_time(archive)
    archive.switch_wal()
    wait_for_replay(archive.cluster, timeout=60)
    return between, after_b


def _marks(cluster: SimCluster) -> dict[str, list[str]]:
    wait_for_replay(cluster, timeout=60)
    out: dict[str, list[str]] = {}
    for vm in cluster.vms:
        rows = vm.psql("SELECT coalesce(string_agg(mark, ',' ORDER BY mark), '') "
                       "FROM public.pitr_marks")
        out[vm.name] = [m for m in rows.strip().split(",") if m]
    return out


def _monit_all_running(cluster: SimCluster) -> dict[str, str]:
    return {vm.name: vm.run("/var/vcap/bosh/bin/monit summary").stdout for vm in cluster.vms}


def _succeeded(result: subprocess.CompletedProcess[str], status: dict[str, Any]) -> None:
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert status["phase"] == "Rejoined", status.get("message")


@pytest.mark.slow
def test_pitr_target_between_two_commits_keeps_a_and_drops_b_on_every_node(
    wale_archive: WaleArchive, tmp_path: Path
) -> None:
    between, _after_b = _write_a_then_b(wale_archive)
    result, status = _recover(tmp_path, wale_archive, "pitr-between", between)
    _succeeded(result, status)
    assert _marks(wale_archive.cluster) == {vm.name: ["A"] for vm in wale_archive.cluster.vms}
    facts = status["facts"]
    assert facts["baseBackup"] == wale_archive.base_backup.name
    assert wale_archive.base_backup.name in facts["recoveryWindow"]
    reached = datetime.fromisoformat(facts["reachedTime"])
    assert reached <= between
    assert facts["recoveryTarget"] == between.isoformat()
    assert wale_archive.cluster.wait_healthy(timeout=60).ok


def test_pitr_through_the_director_reaches_rejoined_and_leaves_no_user(
    wale_archive: WaleArchive, bosh_director: DirectorEmulator, tmp_path: Path
) -> None:
    """target.bosh for WAL-E (issue 21): a recovery file naming no VM and no SSH key, and the
    bosh CLI's BOSH_* variables; the director lists the VMs and opens them with an ephemeral
    user, removed at the end."""
    cluster = wale_archive.cluster
    between, _after_b = _write_a_then_b(wale_archive)
    argv, status_file = _argv(tmp_path, wale_archive, "pitr-bosh", between)
    manifest = tmp_path / "pitr-bosh.yaml"
    doc = yaml.safe_load(manifest.read_text())
    doc["spec"]["target"].pop("nodes")
    doc["spec"]["target"].pop("ssh")
    manifest.write_text(yaml.safe_dump(doc))
    env = cli_environment(bosh_director, cluster.config.deployment)
    result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=1200, check=False)
    status = _status(status_file)
    _succeeded(result, status)
    assert _marks(cluster) == {vm.name: ["A"] for vm in cluster.vms}
    pinned = json.loads(status["facts"]["boshInstances"])
    assert [(name, addr) for name, _id, addr in pinned] == [
        (vm.name, vm.address) for vm in cluster.vms]
    users = bosh_director.ssh_users(cluster.config.deployment)
    assert {vm: [u for u in names if "pgrecovery" in u] for vm, names in users.items()} == {
        vm.name: [] for vm in cluster.vms}
    assert any(t.description == "ssh: setup" for t in bosh_director._tasks.values())
    assert bosh_director.clients[CLIENT_ID].secret not in result.stdout + result.stderr
    assert cluster.wait_healthy(timeout=60).ok


@pytest.mark.slow
def test_pitr_target_beyond_archive_with_best_effort_recovers_everything(
    wale_archive: WaleArchive, tmp_path: Path
) -> None:
    _between, after_b = _write_a_then_b(wale_archive)
    target = after_b + timedelta(hours=1)
    result, status = _recover(tmp_path, wale_archive, "pitr-beyond", target, best_effort=True)
    _succeeded(result, status)
    assert _marks(wale_archive.cluster) == {vm.name: ["A", "B"]
                                            for vm in wale_archive.cluster.vms}
    facts = status["facts"]
    assert facts["recoveryTarget"] == "end of archive"
    reached = datetime.fromisoformat(facts["reachedTime"])
    assert after_b - timedelta(seconds=5) <= reached <= datetime.now(UTC)
    assert "beyond the archive" in facts["reachedPoint"]
    assert facts["reachedTime"] in facts["reachedPoint"]


def _assert_untouched(archive: WaleArchive, status: dict[str, Any], before: dict[str, list[str]],
                      reason: str, *needles: str) -> None:
    assert status["phase"] == "Failed"
    assert status["failureReason"] == reason, status.get("message")
    for needle in needles:
        assert needle in status["message"], status["message"]
    done = [s["name"] for s in status.get("steps", []) if s.get("state") == "Succeeded"]
    assert not any(s.startswith("ensure-") for s in done), done
    summaries = _monit_all_running(archive.cluster)
    for vm_name, text in summaries.items():
        assert "Not monitored" not in text, (vm_name, text)
        assert "stop pending" not in text, (vm_name, text)
    assert _marks(archive.cluster) == before
    assert archive.cluster.wait_healthy(timeout=60).ok


@pytest.mark.slow
def test_pitr_target_beyond_archive_without_best_effort_fails_in_fetching_with_the_window(
    wale_archive: WaleArchive, tmp_path: Path
) -> None:
    _between, after_b = _write_a_then_b(wale_archive)
    before = _marks(wale_archive.cluster)
    result, status = _recover(tmp_path, wale_archive, "pitr-strict",
                              after_b + timedelta(hours=1))
    assert result.returncode != 0
    _assert_untouched(wale_archive, status, before, "TargetOutsideWindow",
                      "recoverable window", wale_archive.base_backup.name)


def _segment_after_backup(archive: WaleArchive) -> str:
    """The first WAL segment archived after the base backup ended (row A's)."""
    later = [n for n in archive.window().segments if n > archive.base_backup.stop_segment]
    assert later, archive.window().segments
    return later[0]


# The faults are H4's tools (tests/wale/faults.py); each returns what the message must name.
def _corrupt_wal_block(archive: WaleArchive) -> str:
    return faults.corrupt_wal_segment(archive.target, _segment_after_backup(archive))


def _corrupt_partition(archive: WaleArchive) -> str:
    return faults.corrupt_partition(archive.target, archive.base_backup.name)


def _delete_segment(archive: WaleArchive) -> str:
    return faults.delete_middle_segment(archive.target, archive.base_backup.stop_segment)


def _foreign_sysid(archive: WaleArchive) -> str:
    other = faults.other_sysid(archive.base_backup.sysid)
    faults.write_sysid(archive.target, other)
    return other


@pytest.mark.slow
@pytest.mark.parametrize(
    ("damage", "reason"),
    [(_corrupt_wal_block, "BackupCorrupt"), (_corrupt_partition, "BackupCorrupt"),
     (_delete_segment, "BackupIncomplete"), (_foreign_sysid, "SystemIdMismatch")],
    ids=["corrupt-wal-lzop-block", "corrupt-partition-lzop-block", "missing-wal-segment",
         "wrong-sysid"],
)
def test_bad_archive_fails_in_fetching_with_the_cluster_untouched(
    wale_archive: WaleArchive, tmp_path: Path, damage: Any, reason: str
) -> None:
    between, _after_b = _write_a_then_b(wale_archive)
    before = _marks(wale_archive.cluster)
    named = damage(wale_archive)
    result, status = _recover(tmp_path, wale_archive, "pitr-bad", between)
    assert result.returncode != 0
    _assert_untouched(wale_archive, status, before, reason, named)


def _succeeded_steps(status: dict[str, Any]) -> set[str]:
    return {s["name"] for s in status.get("steps", []) if s.get("state") == "Succeeded"}


@pytest.mark.slow
@pytest.mark.parametrize(
    "kill_after",
    ["ensure-data-dir-replaced", "ensure-recovery-started"],
    ids=["old-data-gone", "replaying"],
)
def test_pitr_killed_in_restoring_resumes_and_completes(
    wale_archive: WaleArchive, tmp_path: Path, kill_after: str
) -> None:
    """SIGKILL of the local run right after a destructive step; `--resume` finishes the
    recovery without redoing finished steps (the base backup is not unpacked twice, recovery
    settings are not written again after replay began)."""
    between, _after_b = _write_a_then_b(wale_archive)
    argv, status_file = _argv(tmp_path, wale_archive, "pitr-kill", between)
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 900
    killed = False
    while time.monotonic() < deadline and proc.poll() is None:
        if kill_after in _succeeded_steps(_status(status_file)):
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert killed, f"never saw {kill_after} finish: {_status(status_file).get('message')}"
    resumed = subprocess.run([*argv, "--resume"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=1200, check=False)
    status = _status(status_file)
    _succeeded(resumed, status)
    assert _marks(wale_archive.cluster) == {vm.name: ["A"] for vm in wale_archive.cluster.vms}
    assert wale_archive.cluster.wait_healthy(timeout=60).ok


@pytest.mark.slow
def test_second_pitr_follows_the_timeline_the_first_one_created(
    wale_archive: WaleArchive, tmp_path: Path
) -> None:
    """PITR to between A and B promotes timeline N+1, which keeps archiving into the same
    prefix (with its .history file and the old timeline's .partial). Row C is committed on
    it. A second PITR to after C must follow the new timeline: A and C, never B."""
    between, _after_b = _write_a_then_b(wale_archive)
    first, status = _recover(tmp_path / "one", wale_archive, "pitr-first", between)
    _succeeded(first, status)
    old_tli = int(status["facts"]["timeline"]) - 1
    wale_archive.primary.psql("INSERT INTO public.pitr_marks VALUES ('C')")
    after_c = _vm_time(wale_archive)
    wale_archive.switch_wal()
    history = f"{old_tli + 1:08X}.history"
    assert history in wale_archive.window().history, wale_archive.window().history
    time.sleep(1.0)
    second, status = _recover(tmp_path / "two", wale_archive, "pitr-second",
                              after_c + timedelta(milliseconds=500), best_effort=True)
    _succeeded(second, status)
    assert _marks(wale_archive.cluster) == {vm.name: ["A", "C"]
                                            for vm in wale_archive.cluster.vms}
    segments = status["facts"]["walSegments"].split(",")
    timelines = sorted({int(s[:8], 16) for s in segments})
    assert timelines == [old_tli, old_tli + 1], segments
    assert status["facts"]["baseBackup"] == wale_archive.base_backup.name


@pytest.mark.slow
def test_dry_run_shows_window_and_choice_and_changes_nothing(
    wale_archive: WaleArchive, tmp_path: Path
) -> None:
    between, _after_b = _write_a_then_b(wale_archive)
    before = _marks(wale_archive.cluster)
    result, status = _recover(tmp_path, wale_archive, "pitr-dry", between, dry_run=True)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    facts = status["facts"]
    assert wale_archive.base_backup.name in facts["recoveryWindow"]
    assert facts["baseBackup"] == wale_archive.base_backup.name
    assert facts["recoveryTarget"] == between.isoformat()
    assert "reachedTime" not in facts
    assert {c["type"]: c.get("reason") for c in status["conditions"]}["Blocked"] == \
        "DryRunComplete"
    assert _marks(wale_archive.cluster) == before
    for vm_name, text in _monit_all_running(wale_archive.cluster).items():
        assert "Not monitored" not in text, (vm_name, text)


@pytest.mark.slow
def test_no_room_to_keep_the_old_data_wipes_it_and_still_recovers(
    wale_archive: WaleArchive, tmp_path: Path
) -> None:
    """The store of the primary has room for the restore but not for the old data directory
    beside it: Fetching decides to wipe (status says so), the recovery completes."""
    between, _after_b = _write_a_then_b(wale_archive)
    primary = wale_archive.primary
    # About 100 MiB free: base backup (~30 MB expanded) + staged WAL + replay room fit, the
    # old data directory (~180 MB) kept aside would not.
    primary.limit_store_free_space(100 * 1024 * 1024)
    try:
        result, status = _recover(tmp_path, wale_archive, "pitr-wipe", between)
    finally:
        primary.reset_store_size()
    _succeeded(result, status)
    facts = status["facts"]
    assert facts["keepOldData"] == "false", facts["spacePlan"]
    assert "wiped" in facts["spacePlan"]
    assert "oldDataDir" not in facts
    assert _marks(wale_archive.cluster) == {vm.name: ["A"] for vm in wale_archive.cluster.vms}


@pytest.mark.slow
def test_replay_failing_after_destruction_ends_restore_failed_and_keeps_the_old_data(
    wale_archive: WaleArchive, tmp_path: Path
) -> None:
    """A staged WAL segment disappears on the VM between Decrypting and Restoring: PostgreSQL
    ends recovery short of the target (FATAL). The recovery ends Failed/RestoreFailed with the
    server's FATAL line, and the old data directory named in the status is intact (a clean
    shutdown of the same cluster: a person can move it back)."""
    between, _after_b = _write_a_then_b(wale_archive)
    primary = wale_archive.primary  # after the failure no VM is primary: keep it
    sysid = primary.psql("SELECT system_identifier FROM pg_control_system()").strip()
    argv, status_file = _argv(tmp_path, wale_archive, "pitr-fatal", between)
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while "ensure-wal-staged" not in _succeeded_steps(_status(status_file)):
        assert proc.poll() is None, _status(status_file).get("message")
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    staged = _status(status_file)["facts"]["walStaged"]
    victim = _segment_after_backup(wale_archive)
    primary.run(f"rm -f {staged}/{victim}")
    resumed = subprocess.run([*argv, "--resume"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=1200, check=False)
    status = _status(status_file)
    assert resumed.returncode != 0
    assert status["phase"] == "Failed"
    assert status["failureReason"] == "RestoreFailed", status["message"]
    assert "recovery ended before configured recovery target was reached" in status["message"]
    old = status["facts"]["oldDataDir"]
    try:
        # The kept directory is the cluster as it was: shut down cleanly, same system id,
        # its WAL position at or past the point where B was written.
        control = primary.run(f"LC_ALL=C {PG_BINDIR}/pg_controldata {old}").stdout
        assert "Database cluster state:               shut down" in control, control
        assert f"Database system identifier:           {sysid}" in control, control
    finally:
        wale_archive.cluster.rebuild()  # monit restarts the failed server: a new cluster
