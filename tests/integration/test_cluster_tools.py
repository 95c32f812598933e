"""The Fetching check of the cluster's tools, and both helper conventions, for real.

A cluster built by other hands had helper functions that drop privileges themselves; calling
them as postgres (the runbook's text) failed after the point of no return. On the simulated
VMs — one cluster per convention (`ClusterConfig.helper_privileges`) — this proves:

* the check determines each convention from the helpers' bodies, and the fallback when
  `register_master_node` is missing, without changing anything;
* registering the primary works the way the check chose (and the other way really fails,
  as on the cluster that was seen);
* a local end-to-end recovery completes on both conventions, with the choice in status;
* a cluster whose helpers are missing, renamed or unreadable fails in Fetching with
  `ClusterToolsMismatch` naming node, path and function, and NOTHING changed on any node
  (monit states, pg_hba, repmgr rows, replication slots).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from pgrecovery.adapters.ssh import SshAuth, SshPool
from pgrecovery.cluster import tools
from pgrecovery.cluster.a9s import A9sOperations
from pgrecovery.cluster.nodes import A9sLayout, Node
from pgrecovery.errors import ClusterToolsMismatch
from tests.objectstores.servers import S3Server
from tests.scenario import Scenario, local_recover_argv
from tests.simcluster.cluster import SimCluster, SimVM

pytestmark = [pytest.mark.integration, pytest.mark.vms]

JOB = "/var/vcap/jobs/postgresql-ha"
UTILS = f"{JOB}/helpers/repmgr_utils.sh"
CONVENTIONS = {
    "caller": tools.Convention.CALLER_DROPS,
    "helper": tools.Convention.HELPER_DROPS,
}


@pytest.fixture(params=["caller", "helper"])
def cluster(request: pytest.FixtureRequest) -> SimCluster:
    """The session cluster (helpers called as postgres) or the one whose helpers drop
    privileges themselves; brought up only when a test asks for it."""
    if request.param == "caller":
        c: SimCluster = request.getfixturevalue("healthy_sim_cluster")
    else:
        c = request.getfixturevalue("self_dropping_sim_cluster")
        c.heal(timeout=30)
    assert c.config.helper_privileges == request.param
    return c


def _ops(cluster: SimCluster, pool: SshPool) -> A9sOperations:
    return A9sOperations(pool, [Node(vm.name, vm.address) for vm in cluster.vms])


@pytest.fixture
async def pool(cluster: SimCluster) -> AsyncIterator[SshPool]:
    auth = SshAuth(cluster.ssh_user, cluster.client_key_path.read_bytes(), cluster.known_hosts)
    async with SshPool(auth, connect_timeout=3) as p:
        yield p


def _node_state(vm: SimVM) -> dict[str, object]:
    """What a destructive step would change on a node."""
    return {
        "monit": vm.monit_status(),
        "hba": vm.host_path(f"{JOB}/config/pg_hba.conf").read_text(),
        "hba_orig": vm.host_path(f"{JOB}/config/pg_hba.conf.pgrecovery-orig").exists(),
        "repmgr": vm.psql(
            "SELECT node_id, type, active, upstream_node_id FROM repmgr.nodes ORDER BY 1",
            database="repmgr_cluster",
        ),
        "slots": vm.psql("SELECT slot_name, active FROM pg_replication_slots ORDER BY 1"),
        "in_recovery": vm.is_primary(),
    }


def _cluster_state(cluster: SimCluster) -> dict[str, dict[str, object]]:
    return {vm.name: _node_state(vm) for vm in cluster.vms}


# ----------------------------------------------------------------- the check


async def test_check_determines_the_helper_convention(
    cluster: SimCluster, pool: SshPool
) -> None:
    before = _cluster_state(cluster)
    ops = _ops(cluster, pool)
    primary = next(n for n in ops.nodes if n.name == cluster.primary().name)
    verdicts = await ops.check_cluster_tools(primary)
    want = CONVENTIONS[cluster.config.helper_privileges]
    assert verdicts[0].node == primary.name
    assert {v.node: v.convention for v in verdicts} == {vm.name: want for vm in cluster.vms}
    assert all(v.ok for v in verdicts), verdicts
    assert all(v.repmgr_config == f"{JOB}/config/repmgr.conf" for v in verdicts)
    if want is tools.Convention.HELPER_DROPS:
        assert "chpst -u postgres:vcap repmgr" in verdicts[0].evidence
    assert _cluster_state(cluster) == before


async def test_register_primary_the_way_the_check_chose(
    cluster: SimCluster, pool: SshPool
) -> None:
    """Re-registering the running primary with --force is harmless: each way is run for
    real. The other convention's way fails, as on the cluster where this was found."""
    layout = A9sLayout()
    primary = cluster.primary()
    endpoint = Node(primary.name, primary.address).endpoint
    right = CONVENTIONS[cluster.config.helper_privileges]
    for convention in (right, tools.Convention.HELPER_MISSING):
        res = await pool.run_root(
            endpoint, tools.register_primary_argv(layout, convention), timeout=60, check=False
        )
        assert res.exit_status == 0, (convention, res.stderr)
    wrong = ({*CONVENTIONS.values()} - {right}).pop()
    res = await pool.run_root(
        endpoint, tools.register_primary_argv(layout, wrong), timeout=60, check=False
    )
    assert res.exit_status != 0
    if wrong is tools.Convention.CALLER_DROPS:
        assert "unable to setgroups" in res.stderr, res.stderr
    assert cluster.wait_healthy(timeout=30).ok


@pytest.fixture
def renamed_register_helper(healthy_sim_cluster: SimCluster) -> Iterator[SimCluster]:
    originals = {}
    for vm in healthy_sim_cluster.vms:
        path = vm.host_path(UTILS)
        originals[path] = path.read_text()
        path.write_text(originals[path].replace("register_master_node()",
                                                "register_primary_node()"))
    try:
        yield healthy_sim_cluster
    finally:
        for path, text in originals.items():
            path.write_text(text)


async def test_missing_register_helper_falls_back_to_the_repmgr_command(
    renamed_register_helper: SimCluster,
) -> None:
    cluster = renamed_register_helper
    auth = SshAuth(cluster.ssh_user, cluster.client_key_path.read_bytes(), cluster.known_hosts)
    async with SshPool(auth, connect_timeout=3) as pool:
        ops = _ops(cluster, pool)
        primary = next(n for n in ops.nodes if n.name == cluster.primary().name)
        verdicts = await ops.check_cluster_tools(primary)
    assert {v.convention for v in verdicts} == {tools.Convention.HELPER_MISSING}
    assert "register_master_node not found" in verdicts[0].evidence
    assert "repmgr primary register --force -f" in tools.describe(
        verdicts[0].convention or tools.Convention.HELPER_MISSING, verdicts[0].repmgr_config
    )


# ----------------------------------------------------------------- end to end


def _status(path: Path) -> dict[str, object]:
    return json.loads(path.read_text())["status"]  # type: ignore[no-any-return]


def test_local_recovery_on_both_helper_conventions(
    cluster: SimCluster, moto_s3: S3Server, tmp_path: Path
) -> None:
    scenario = Scenario.prepare(cluster, moto_s3, rows=200)
    argv, status_file = local_recover_argv(
        scenario, tmp_path, f"tools-{cluster.config.helper_privileges}"
    )
    result = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    status = _status(status_file)
    assert status["phase"] == "Rejoined"
    facts: dict[str, str] = status["facts"]  # type: ignore[assignment]
    want = CONVENTIONS[cluster.config.helper_privileges]
    assert facts["helperConvention"] == want.value, facts
    assert facts["registerPrimaryVia"] == tools.describe(want, facts["repmgrConfig"])
    steps = [s["name"] for s in status["steps"]]  # type: ignore[union-attr]
    assert steps.index("check-cluster-tools") == steps.index("probe-cluster") + 1
    assert scenario.restored_everywhere() == {vm.name: True for vm in cluster.vms}
    assert cluster.wait_healthy(timeout=30).ok


# ----------------------------------------------------------------- mismatches


def _move(vm: SimVM, path: str, to: str) -> None:
    vm.host_path(path).rename(vm.host_path(to))


def _append(vm: SimVM, path: str, line: str) -> None:
    with vm.host_path(path).open("a") as f:
        f.write(line + "\n")


def _truncate_last_line(vm: SimVM, path: str) -> None:
    text = vm.host_path(path).read_text()
    vm.host_path(path).write_text(text[: text.rstrip("\n").rfind("\n") + 1])


FAULTS = {
    # pg/2's clone entry point renamed: Rejoined could never re-clone it.
    "pre-start-renamed": (
        "pg/2", lambda vm: _move(vm, f"{JOB}/bin/pre-start", f"{JOB}/bin/pre-start.renamed"),
        lambda vm: _move(vm, f"{JOB}/bin/pre-start.renamed", f"{JOB}/bin/pre-start"),
        [f"pg/2: {JOB}/bin/pre-start is missing"],
    ),
    # A standby's repmgr_utils.sh gone AND no repmgr configuration for the fallback (the
    # probe reads repmgr on the primary only, so the check is the first to see it).
    "helpers-and-repmgr-config-missing": (
        "pg/1",
        lambda vm: (_move(vm, UTILS, UTILS + ".gone"),
                    _move(vm, f"{JOB}/config/repmgr.conf", f"{JOB}/config/repmgr.conf.gone")),
        lambda vm: (_move(vm, UTILS + ".gone", UTILS),
                    _move(vm, f"{JOB}/config/repmgr.conf.gone", f"{JOB}/config/repmgr.conf")),
        [f"pg/1: register_master_node not found ({UTILS} is missing)",
         "repmgr primary register --force"],
    ),
    # register_master_node redefined (a later definition wins) to hand off to a script whose
    # privileges cannot be read.
    "register-helper-undeterminable": (
        "pg/0",
        lambda vm: _append(vm, UTILS, f'register_master_node() {{ {JOB}/bin/register-primary; }}'),
        lambda vm: _truncate_last_line(vm, UTILS),
        ["pg/0: cannot tell how register_master_node", "register-primary"],
    ),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_mismatched_tools_fail_in_fetching_and_change_nothing(
    healthy_sim_cluster: SimCluster, moto_s3: S3Server, tmp_path: Path, fault: str
) -> None:
    cluster = healthy_sim_cluster
    assert cluster.primary().name == "pg/0"
    scenario = Scenario.prepare(cluster, moto_s3, rows=50)
    vm_name, inject, undo, expected = FAULTS[fault]
    vm = cluster.vm(vm_name)
    before = _cluster_state(cluster)
    argv, status_file = local_recover_argv(scenario, tmp_path, f"tools-{fault}")
    inject(vm)
    try:
        result = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True,
                                timeout=600, check=False)
        after = _cluster_state(cluster)
    finally:
        undo(vm)
    assert result.returncode == 1, result.stdout + result.stderr
    status = _status(status_file)
    assert status["phase"] == "Failed"
    assert status["failureReason"] == ClusterToolsMismatch.reason
    assert status["facts"]["failedInPhase"] == "Fetching"  # type: ignore[index]
    for words in expected:
        assert words in str(status["message"]), status["message"]
    assert "nothing was changed" in str(status["message"])
    steps = {s["name"]: s["state"] for s in status["steps"]}  # type: ignore[union-attr]
    assert steps["check-cluster-tools"] == "Failed"
    assert "ensure-standbys-stopped" not in steps
    # nothing changed, on every node
    assert after == before
    assert cluster.wait_healthy(timeout=30).ok


def test_resume_calls_the_helper_the_pinned_way(
    self_dropping_sim_cluster: SimCluster, moto_s3: S3Server, tmp_path: Path
) -> None:
    """Killed (SIGKILL) just as ensure-primary-registered starts, on the cluster whose helpers
    drop privileges themselves: `--resume` registers the primary as the first run's check
    decided (the pinned `helperConvention`), without checking again, and completes."""
    cluster = self_dropping_sim_cluster
    cluster.heal(timeout=30)
    scenario = Scenario.prepare(cluster, moto_s3, rows=300)
    argv, status_file = local_recover_argv(scenario, tmp_path, "tools-resume")
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300

    def steps() -> dict[str, str]:
        try:
            return {s["name"]: s["state"] for s in _status(status_file)["steps"]}  # type: ignore[union-attr]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return {}

    while (time.monotonic() < deadline and proc.poll() is None
           and "ensure-primary-registered" not in steps()):
        time.sleep(0.02)
    assert proc.poll() is None, "finished before ensure-primary-registered was seen"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    first = _status(status_file)["facts"]
    assert first["helperConvention"] == tools.Convention.HELPER_DROPS.value  # type: ignore[index]
    resumed = subprocess.run([*argv, "--resume"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=900, check=False)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    status = _status(status_file)
    assert status["phase"] == "Rejoined"
    facts = status["facts"]
    for key in ("helperConvention", "registerPrimaryVia", "clusterTools"):
        assert facts[key] == first[key], key  # type: ignore[index]
    assert steps()["ensure-primary-registered"] == "Succeeded"
    assert scenario.restored_everywhere() == {vm.name: True for vm in cluster.vms}
    assert cluster.wait_healthy(timeout=30).ok


def test_local_recovery_without_the_register_helper_uses_the_repmgr_command(
    renamed_register_helper: SimCluster, moto_s3: S3Server, tmp_path: Path
) -> None:
    """register_master_node renamed on every node: the recovery completes with the standard
    `repmgr primary register --force -f <config>` and says so in status."""
    cluster = renamed_register_helper
    scenario = Scenario.prepare(cluster, moto_s3, rows=200)
    argv, status_file = local_recover_argv(scenario, tmp_path, "tools-fallback")
    result = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    status = _status(status_file)
    facts: dict[str, str] = status["facts"]  # type: ignore[assignment]
    assert facts["helperConvention"] == tools.Convention.HELPER_MISSING.value
    assert facts["registerPrimaryVia"] == (
        "register_master_node not found: fallback `repmgr primary register --force -f "
        f"{JOB}/config/repmgr.conf` as postgres:vcap"
    )
    assert all(f"{vm.name}: helper-missing" in facts["clusterTools"] for vm in cluster.vms)
    assert scenario.restored_everywhere() == {vm.name: True for vm in cluster.vms}
    assert cluster.wait_healthy(timeout=30).ok
