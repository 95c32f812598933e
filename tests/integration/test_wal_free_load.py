"""The WAL-free load (`cluster.wal_free` + `restore_script`'s TRUNCATE + COPY FREEZE) on the
simulated cluster, through the real CLI.

Observed at breakpoints, not guessed from timing: while the dump loads the primary runs with
`wal_level = minimal`, no WAL senders and `archive_mode = off`, and writes much less WAL than
the tables it loads; afterwards every node has its own settings back (the re-clone needed
them) and the backup's data. With `spec.restore.walFreeLoad: false` nothing of it happens. A
run killed (SIGKILL) while the primary is at `minimal` leaves the marker, and a new run puts
the settings back and completes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.test_local_recover import _status
from tests.objectstores.servers import S3Server
from tests.scenario import Scenario, leftover_scan, local_recover_argv
from tests.simcluster.cluster import SimCluster, SimVM

pytestmark = [pytest.mark.integration, pytest.mark.vms, pytest.mark.timeout(1200)]

MARKER = "/var/vcap/store/pgrecovery/wal-free-settings"
AUTO_CONF = "/var/vcap/store/postgresql15/postgresql.auto.conf"
# Enough rows that the tables pass wal_skip_threshold (2 MB) by far: smaller ones are WAL-logged
# whole at commit even under wal_level minimal (at 40000 rows, 25 MB of tables, the WAL-free
# load wrote 6.5 MB of WAL besides CREATE DATABASE, the load as before 9.7 MB).
ROWS = 150000


def _argv(scenario: Scenario, directory: Path, name: str, *,
          wal_free: bool | None = None) -> tuple[list[str], Path]:
    argv, status_file = local_recover_argv(scenario, directory, name)
    if wal_free is not None:
        manifest = directory / f"{name}.yaml"
        doc = yaml.safe_load(manifest.read_text())
        doc["spec"].setdefault("restore", {})["walFreeLoad"] = wal_free
        manifest.write_text(yaml.safe_dump(doc))
    return argv, status_file


def _wait_reached(breakpoints: Path, name: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 300
    while not (breakpoints / f"{name}.reached").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out = proc.communicate()[0]
            pytest.fail(f"the recovery never reached {name}:\n{out[-3000:]}")
        time.sleep(0.05)


def _settings(vm: SimVM) -> str:
    return vm.psql("SHOW wal_level; SHOW max_wal_senders; SHOW archive_mode;")


def _lsn(vm: SimVM) -> int:
    text = vm.psql("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn;").strip()
    return int(float(text))


def _table_bytes(vm: SimVM) -> int:
    total = 0
    for db in ("shop", "crm"):
        total += int(vm.psql(
            "SELECT coalesce(sum(pg_relation_size(c.oid)), 0) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' "
            "AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'repmgr')",
            database=db).strip())
    return total


def _assert_original_settings(cluster: SimCluster) -> None:
    for vm in cluster.vms:
        assert _settings(vm).split("\n")[0] == "replica", vm.name
        assert "wal_level" not in vm.host_path(AUTO_CONF).read_text(), vm.name
        assert not vm.host_path(MARKER).exists(), vm.name


def _run_with_holds(scenario: Scenario, directory: Path, name: str, holds: list[str],
                    wal_free: bool | None = None) -> dict[str, dict[str, object]]:
    """Run to completion, stopping at each breakpoint in `holds` to look at the primary."""
    breakpoints = directory / "breakpoints"
    breakpoints.mkdir(parents=True)
    for h in holds:
        (breakpoints / f"{h}.hold").touch()
    argv, status_file = _argv(scenario, directory, name, wal_free=wal_free)
    env = {**os.environ, "PGRECOVERY_BREAKPOINT_DIR": str(breakpoints)}
    seen: dict[str, dict[str, object]] = {}
    primary = scenario.cluster.primary()
    with subprocess.Popen(argv, cwd=directory, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as proc:
        for h in holds:
            _wait_reached(breakpoints, h, proc)
            seen[h] = {"settings": _settings(primary), "lsn": _lsn(primary),
                       "marker": primary.host_path(MARKER).exists()}
            (breakpoints / f"{h}.hold").unlink()
        out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    seen["status"] = _status(status_file)
    return seen


def test_wal_free_load_runs_while_the_standbys_are_down_and_is_put_back(
    healthy_sim_cluster: SimCluster, moto_s3: S3Server, tmp_path: Path
) -> None:
    scenario = Scenario.prepare(healthy_sim_cluster, moto_s3, rows=ROWS)
    seen = _run_with_holds(scenario, tmp_path, "walfree",
                           ["before-restore-dump", "before-ensure-bulk-load-settings-reverted"])
    during, after = seen["before-restore-dump"], seen["before-ensure-bulk-load-settings-reverted"]
    assert during["settings"] == "minimal\n0\noff", during
    assert during["marker"] is True
    status = seen["status"]
    facts: dict[str, str] = status["facts"]  # type: ignore[assignment]
    assert facts["walFreeLoad"].startswith("on; settings applied: wal_level minimal"), facts
    assert "was wal_level replica" in facts["walFreeLoad"]
    assert facts["walFreeSettings"] == "reverted", facts
    assert facts["restoreMode"].startswith("parallel "), facts
    # The tables were written without WAL: the restore's whole WAL, CREATE DATABASE included
    # (PostgreSQL 15 logs the template's blocks at any wal_level: ~22 MB for this dump), is
    # under half of the tables it loaded (measured: 38 MB for 94 MB; as before it is more).
    primary = healthy_sim_cluster.primary()
    wal = int(after["lsn"]) - int(during["lsn"])  # type: ignore[call-overload]
    heap = _table_bytes(primary)
    assert heap > 50_000_000, heap
    assert wal < heap / 2, f"restore wrote {wal} B of WAL for {heap} B of tables"
    assert status["phase"] == "Rejoined"
    assert scenario.restored_everywhere() == {vm.name: True for vm in healthy_sim_cluster.vms}
    assert healthy_sim_cluster.wait_healthy(timeout=60).ok
    _assert_original_settings(healthy_sim_cluster)
    assert leftover_scan(healthy_sim_cluster, tmp_path / "work",
                         dump_of=scenario.backup.backup_id) == []
    print(f"\nWAL-free load: {wal} B of WAL during the restore for {heap} B of tables")


def test_wal_free_load_switched_off_keeps_the_settings(
    healthy_sim_cluster: SimCluster, moto_s3: S3Server, tmp_path: Path
) -> None:
    scenario = Scenario.prepare(healthy_sim_cluster, moto_s3, rows=300, part_size=64 * 1024)
    seen = _run_with_holds(scenario, tmp_path, "walfree-off", ["before-restore-dump"],
                           wal_free=False)
    during = seen["before-restore-dump"]
    assert str(during["settings"]).startswith("replica\n"), during
    assert during["marker"] is False
    status = seen["status"]
    facts: dict[str, str] = status["facts"]  # type: ignore[assignment]
    assert facts["walFreeLoad"] == "off (spec.restore.walFreeLoad is false)", facts
    steps = [s["name"] for s in status["steps"]]  # type: ignore[attr-defined]
    assert "ensure-wal-free-settings" not in steps
    assert "ensure-wal-free-settings-reverted" in steps
    assert scenario.restored_everywhere() == {vm.name: True for vm in healthy_sim_cluster.vms}
    _assert_original_settings(healthy_sim_cluster)


def test_kill_while_at_minimal_then_a_new_run_puts_the_settings_back(
    healthy_sim_cluster: SimCluster, moto_s3: S3Server, tmp_path: Path
) -> None:
    scenario = Scenario.prepare(healthy_sim_cluster, moto_s3, rows=300, part_size=64 * 1024)
    first = tmp_path / "killed"
    breakpoints = first / "breakpoints"
    breakpoints.mkdir(parents=True)
    (breakpoints / "before-restore-dump.hold").touch()
    argv, _ = _argv(scenario, first, "killed")
    env = {**os.environ, "PGRECOVERY_BREAKPOINT_DIR": str(breakpoints)}
    with subprocess.Popen(argv, cwd=first, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as proc:
        _wait_reached(breakpoints, "before-restore-dump", proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    primary = healthy_sim_cluster.primary()
    assert _settings(primary) == "minimal\n0\noff"
    assert primary.host_path(MARKER).exists()
    # A new recovery (new status file, new run id) of the same deployment.
    second = tmp_path / "new"
    second.mkdir()
    argv, status_file = _argv(scenario, second, "new")
    result = subprocess.run(argv, cwd=second, capture_output=True, text=True, timeout=600,
                            check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert _status(status_file)["phase"] == "Rejoined"
    assert scenario.restored_everywhere() == {vm.name: True for vm in healthy_sim_cluster.vms}
    assert healthy_sim_cluster.wait_healthy(timeout=60).ok
    _assert_original_settings(healthy_sim_cluster)
