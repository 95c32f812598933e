"""Failure walk: every destructive step fails for real once, and a new run repairs the cluster.

For each step of Staging, Restoring and Rejoined (taken from the real plan, so a new step is
walked too), a local recovery (`pgrecovery recover`, the real CLI against the simulated 3-VM
cluster and a real S3 server) is stopped at the step's breakpoint (`engine/breakpoints.py`);
there the SSH user loses its sudo rights on every VM — a real fault, the kind an expiring BOSH
ephemeral user or a changed runtime config produces — and the step runs and fails. Then sudo
comes back and a *new* recovery of the same deployment (new status file, new run id) must
complete from whatever the failed one left: data equal to the backup on every node, the cluster
healthy (repmgr, monit, streaming), and nothing of either run left on the VMs or in the work
directory. The report prints `failure points: tried N, repaired M` with the state each failure
left and how long the repair took.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.test_local_recover import _status
from tests.objectstores.servers import S3Server
from tests.plan_steps import plan_of
from tests.scenario import Scenario, leftover_scan, local_recover_argv
from tests.simcluster.cluster import SimCluster

pytestmark = [pytest.mark.integration, pytest.mark.vms, pytest.mark.slow,
              pytest.mark.timeout(1800)]

DESTRUCTIVE = ("Staging", "Restoring", "Rejoined")
SUDOERS = "/etc/sudoers.d/bosh_sudoers"
REVOKED = "/etc/sudoers.d/.bosh_sudoers.revoked"  # sudo skips names starting with a dot


@dataclass
class Point:
    step: str
    failed_with: str = ""
    failed_step: str = ""
    repaired: bool = False
    repair_seconds: float = 0.0
    problem: str = ""

    def line(self) -> str:
        verdict = (f"repaired in {self.repair_seconds:.0f} s" if self.repaired
                   else f"NOT repaired: {self.problem}")
        return f"    {self.step}: failed ({self.failed_with}) → {verdict}\n"


def _revoke_sudo(cluster: SimCluster) -> None:
    for vm in cluster.vms:
        vm.run(f"mv {SUDOERS} {REVOKED}")


def _restore_sudo(cluster: SimCluster) -> None:
    for vm in cluster.vms:
        vm.run(f"if [ -e {REVOKED} ]; then mv {REVOKED} {SUDOERS}; fi")


def _fail_at(step: str, scenario: Scenario, directory: Path, cluster: SimCluster) -> Point:
    point = Point(step)
    breakpoints = directory / "breakpoints"
    breakpoints.mkdir(parents=True)
    (breakpoints / f"before-{step}.hold").touch()
    argv, status_file = local_recover_argv(scenario, directory, "failing")
    env = {**os.environ, "PGRECOVERY_BREAKPOINT_DIR": str(breakpoints)}
    with subprocess.Popen(argv, cwd=directory, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as proc:
        deadline = time.monotonic() + 180
        while not (breakpoints / f"before-{step}.reached").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                out = proc.communicate()[0]
                pytest.fail(f"{step}: the recovery never reached the step:\n{out[-3000:]}")
            time.sleep(0.05)
        _revoke_sudo(cluster)
        try:
            (breakpoints / f"before-{step}.hold").unlink()
            out = proc.communicate(timeout=300)[0]
        finally:
            _restore_sudo(cluster)
    status = _status(status_file)
    assert proc.returncode == 1, f"{step}: expected a failure, got {proc.returncode}:\n{out}"
    point.failed_with = str(status.get("failureReason"))
    records: list[dict[str, str]] = status.get("steps", [])  # type: ignore[assignment]
    failed = [s["name"] for s in records if s["state"] == "Failed"]
    point.failed_step = failed[0] if failed else "?"
    assert point.failed_step == step, f"{step}: failed elsewhere: {failed}\n{out[-2000:]}"
    return point


def _repair(point: Point, scenario: Scenario, directory: Path, cluster: SimCluster) -> None:
    argv, status_file = local_recover_argv(scenario, directory, "repair")
    started = time.monotonic()
    result = subprocess.run(argv, cwd=directory, capture_output=True, text=True, timeout=600,
                            check=False)
    point.repair_seconds = time.monotonic() - started
    problems: list[str] = []
    if result.returncode != 0:
        status = _status(status_file)
        problems.append(f"exit {result.returncode}: {status.get('failureReason')}: "
                        f"{str(status.get('message'))[:600]}")
    else:
        restored = scenario.restored_everywhere()
        if restored != {vm.name: True for vm in cluster.vms}:
            problems.append(f"data differs: {restored}")
        health = cluster.wait_healthy(timeout=60)
        if not health.ok:
            problems.append(f"unhealthy: {health.problems}")
        # The WAL-free load's settings (wal_level minimal, no WAL senders) are back everywhere.
        for vm in cluster.vms:
            level = vm.psql("SHOW wal_level;").strip()
            if level != "replica":
                problems.append(f"{vm.name}: wal_level {level}")
        left = leftover_scan(cluster, directory / "work", dump_of=scenario.backup.backup_id)
        if left:
            problems.append(f"left behind: {left}")
    point.repaired = not problems
    point.problem = "; ".join(problems)


def test_every_destructive_step_fails_for_real_and_a_new_run_repairs(
    healthy_sim_cluster: SimCluster, moto_s3: S3Server, tmp_path: Path
) -> None:
    scenario = Scenario.prepare(healthy_sim_cluster, moto_s3, rows=300, part_size=64 * 1024)
    plan = plan_of(scenario.manifest("failing"), tmp_path / "plan")
    steps = [step for phase, names in plan if phase in DESTRUCTIVE for step in names]
    # A targeted run (the whole walk takes long): PGRECOVERY_FAILURE_WALK_STEPS=a,b
    only = [s for s in os.environ.get("PGRECOVERY_FAILURE_WALK_STEPS", "").split(",") if s]
    if only:
        assert set(only) <= set(steps), f"not in the plan: {sorted(set(only) - set(steps))}"
        steps = [s for s in steps if s in only]
    points: list[Point] = []
    for step in steps:
        directory = tmp_path / step
        point = _fail_at(step, scenario, directory, healthy_sim_cluster)
        _repair(point, scenario, directory, healthy_sim_cluster)
        points.append(point)
        if not point.repaired:
            healthy_sim_cluster.rebuild()  # the next point starts from a healthy cluster
            scenario = Scenario.prepare(healthy_sim_cluster, moto_s3, rows=300,
                                        part_size=64 * 1024)
    repaired = sum(p.repaired for p in points)
    report = (f"failure points: tried {len(points)}, repaired {repaired}\n"
              + "".join(p.line() for p in points))
    print("\n" + report)
    assert repaired == len(points) == len(steps), report
