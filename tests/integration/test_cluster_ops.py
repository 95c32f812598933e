"""The a9s-pg runbook operations against the simulated BOSH VMs (real sshd, PostgreSQL 15,
repmgr, monit, chpst), over SSH as the unprivileged `bosh ssh`-style user with sudo.

What this proves:
* every fetching check fails *before anything is stopped* with a reason a person can act on
  (host key mismatch, unreachable node, two primaries, no primary, disk too small), and all
  monit processes are still running afterwards;
* the whole runbook — stage, restore, rejoin — restores the backup's data on all three nodes,
  leaves repmgr healthy with both standbys streaming, the staging file gone and connections
  accepted again; every step run a second time reports no change.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pgrecovery.adapters.ssh import FileSource, SshAuth, SshPool
from pgrecovery.cluster.a9s import A9sOperations, StepResult, estimate_needed_bytes
from pgrecovery.cluster.nodes import ClusterView, Node, ProgressEvent
from pgrecovery.errors import (
    HostKeyMismatch,
    InsufficientSpace,
    NodeUnreachable,
    PrimaryAmbiguous,
)
from tests.simcluster import SimCluster, table_checksums, wait_for_replay, write_sample_data
from tests.simcluster.config import PG_BINDIR

pytestmark = [pytest.mark.integration, pytest.mark.vms]

BACKUP_ID = "de2fe9e4-6535-423d-8709-dca87df7985c-1740130000000"
RUN_ID = "itest-run-1"


def _nodes(cluster: SimCluster) -> list[Node]:
    return [Node(vm.name, vm.address) for vm in cluster.vms]


def _auth(cluster: SimCluster, known_hosts: str | None = None) -> SshAuth:
    return SshAuth(
        cluster.ssh_user,
        cluster.client_key_path.read_bytes(),
        known_hosts if known_hosts is not None else cluster.known_hosts,
    )


@pytest.fixture
async def pool(healthy_sim_cluster: SimCluster) -> AsyncIterator[SshPool]:
    async with SshPool(_auth(healthy_sim_cluster), connect_timeout=3) as p:
        yield p


def _all_monit_running(cluster: SimCluster) -> None:
    for vm in cluster.vms:
        status = vm.monit_status()
        assert status.get("postgresql-ha") == "OK", (vm.name, status)
        assert status.get("repmgr") == "OK", (vm.name, status)


# ----------------------------------------------------------------- checks fail early


async def test_probe_finds_primary_and_is_read_only(
    healthy_sim_cluster: SimCluster, pool: SshPool
) -> None:
    events: list[ProgressEvent] = []
    ops = A9sOperations(pool, _nodes(healthy_sim_cluster), progress=events.append)
    view = await ops.probe_nodes()
    assert view.primary.name == healthy_sim_cluster.primary().name
    assert len(view.standbys) == 2
    assert {e.node for e in events} == {"pg/0", "pg/1", "pg/2"}
    free = await ops.check_free_space(view.primary, 1024)
    assert free.available > 1024
    assert (await ops.probe_nodes()).primary == view.primary
    _all_monit_running(healthy_sim_cluster)


async def test_host_key_mismatch_fails_the_probe(healthy_sim_cluster: SimCluster) -> None:
    lines = healthy_sim_cluster.known_hosts.splitlines()
    other = healthy_sim_cluster.vm(2).host_key_public
    lines[1] = f"{healthy_sim_cluster.vm(1).address} {other}"  # pg/1 "recreated"
    async with SshPool(_auth(healthy_sim_cluster, "\n".join(lines) + "\n")) as p:
        with pytest.raises(HostKeyMismatch, match="pg/1"):
            await A9sOperations(p, _nodes(healthy_sim_cluster)).probe_nodes()
    _all_monit_running(healthy_sim_cluster)


async def test_unreachable_node_fails_the_probe(
    healthy_sim_cluster: SimCluster, pool: SshPool
) -> None:
    vm = healthy_sim_cluster.vm(2)
    vm.cut_network()
    try:
        with pytest.raises(NodeUnreachable, match="pg/2"):
            await A9sOperations(pool, _nodes(healthy_sim_cluster)).probe_nodes()
    finally:
        vm.restore_network()
    _all_monit_running(healthy_sim_cluster)


async def test_two_primaries_fail_the_probe(healthy_sim_cluster: SimCluster, pool: SshPool) -> None:
    vm = healthy_sim_cluster.vm(2)
    vm.run(
        [
            "chpst",
            "-u",
            "postgres:vcap",
            f"{PG_BINDIR}/pg_ctl",
            "promote",
            "-w",
            "-D",
            "/var/vcap/store/postgresql15",
        ]
    )
    try:
        with pytest.raises(PrimaryAmbiguous, match="found 2"):
            await A9sOperations(pool, _nodes(healthy_sim_cluster)).probe_nodes()
        _all_monit_running(healthy_sim_cluster)
    finally:
        healthy_sim_cluster.rebuild()


async def test_no_primary_fails_the_probe(healthy_sim_cluster: SimCluster, pool: SshPool) -> None:
    primary = healthy_sim_cluster.primary()
    # PostgreSQL is down on the primary while the VM answers; monit must not restart it
    # during the probe, so it is unmonitored first (as a person debugging would).
    primary.monit("unmonitor", "postgresql-ha", check=True)
    primary.run(
        [
            "chpst",
            "-u",
            "postgres:vcap",
            f"{PG_BINDIR}/pg_ctl",
            "stop",
            "-m",
            "fast",
            "-D",
            "/var/vcap/store/postgresql15",
        ]
    )
    try:
        with pytest.raises(PrimaryAmbiguous, match="found 0"):
            await A9sOperations(pool, _nodes(healthy_sim_cluster)).probe_nodes()
    finally:
        primary.monit("start", "postgresql-ha", check=True)
        healthy_sim_cluster.heal(timeout=60)
    _all_monit_running(healthy_sim_cluster)


async def test_disk_too_small_fails_the_space_check(
    healthy_sim_cluster: SimCluster, pool: SshPool
) -> None:
    ops = A9sOperations(pool, _nodes(healthy_sim_cluster))
    view = await ops.probe_nodes()
    primary = healthy_sim_cluster.vm(view.primary.name)
    primary.limit_store_free_space(8 * 1024 * 1024)
    try:
        needed = estimate_needed_bytes(compressed_size=10 * 1024 * 1024)
        with pytest.raises(InsufficientSpace, match=str(needed)) as err:
            await ops.check_free_space(view.primary, needed)
        assert "bytes free" in str(err.value)
    finally:
        primary.reset_store_size()
    _all_monit_running(healthy_sim_cluster)


# ----------------------------------------------------------------- the whole runbook


def _host_can_connect(cluster: SimCluster, address: str) -> tuple[bool, str]:
    """A TCP login from the host (10.x.0.1, not a cluster node), as an application would."""
    env = {**os.environ, "PGPASSWORD": cluster.passwords["a9s_admin"], "PGCONNECT_TIMEOUT": "3"}
    proc = subprocess.run(
        [
            f"{PG_BINDIR}/psql",
            "-X",
            "-tAc",
            "select 1",
            f"host={address} user=a9s_admin dbname=postgres sslmode=disable",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    return proc.returncode == 0, proc.stderr


async def _twice(step: str, run: object) -> StepResult:
    assert callable(run)
    first = await run()
    second = await run()
    assert isinstance(first, StepResult)
    assert isinstance(second, StepResult)
    assert not second.changed, f"{step}: second run changed something: {second.message}"
    return first


async def test_full_runbook_restores_the_backup_on_all_nodes(
    healthy_sim_cluster: SimCluster, pool: SshPool, tmp_path: Path
) -> None:
    cluster = healthy_sim_cluster
    primary_vm = cluster.primary()
    write_sample_data(primary_vm, rows=300)
    wait_for_replay(cluster)
    expected = table_checksums(primary_vm)
    dump = tmp_path / "backup.dump"
    with dump.open("wb") as fh:
        # --clean: the backup replaces databases that exist (the same-deployment case).
        proc = primary_vm.popen(
            ["chpst", "-u", "postgres:vcap", f"{PG_BINDIR}/pg_dumpall", "--clean", "--if-exists"],
            stdout=fh,
        )
        assert proc.wait(timeout=120) == 0
    # The accident: data changed after the backup.
    write_sample_data(primary_vm, rows=40, seed=7, databases=("shop",))
    primary_vm.psql("DELETE FROM public.orders WHERE id % 2 = 0", database="crm")
    assert table_checksums(primary_vm) != expected

    events: list[ProgressEvent] = []
    ops = A9sOperations(pool, _nodes(cluster), progress=events.append)

    # Fetching / Decrypting
    view: ClusterView = await ops.probe_nodes()
    await ops.check_free_space(view.primary, estimate_needed_bytes(plain_size=dump.stat().st_size))
    await _twice("ensure_restore_dir", lambda: ops.ensure_restore_dir(view.primary))
    staged = await ops.upload_dump(
        view.primary, FileSource(dump), BACKUP_ID, total_bytes=dump.stat().st_size
    )
    assert staged.size == dump.stat().st_size
    again = await ops.upload_dump(view.primary, FileSource(dump), BACKUP_ID)
    assert again.sha256 == staged.sha256
    assert any(e.step == "upload_dump" and e.done == staged.size for e in events)

    # Staging
    await _twice("standbys", lambda: ops.ensure_standbys_stopped(view))
    for standby in view.standbys:
        assert cluster.vm(standby.name).monit_status()["postgresql-ha"] == "Not monitored"
    await _twice("repmgr", lambda: ops.ensure_repmgr_stopped_on_primary(view))
    await _twice("slots", lambda: ops.ensure_inactive_slots_dropped(view))
    await _twice("block", lambda: ops.ensure_connections_blocked(view))
    ok, err = _host_can_connect(cluster, view.primary.address)
    assert not ok
    assert "pg_hba.conf rejects connection" in err
    await _twice("locks", lambda: ops.ensure_startup_locks_clear(view))

    # Restoring
    await ops.start_restore(view, BACKUP_ID, RUN_ID)
    await ops.start_restore(view, BACKUP_ID, RUN_ID)  # finds the job, starts nothing
    for _ in range(300):
        status = await ops.poll_restore(view, BACKUP_ID, RUN_ID)
        if status.done:
            break
        await asyncio.sleep(1)
    assert status.done
    assert status.report is not None
    assert status.report.ok
    assert status.report.expected["current user cannot be dropped"] == 1

    # Rejoined
    await _twice("truncate", lambda: ops.ensure_repmgr_schema_truncated(view, RUN_ID))
    await _twice("register", lambda: ops.ensure_primary_registered(view))
    await _twice("repmgr running", lambda: ops.ensure_repmgr_running_on_primary(view))
    for standby in view.standbys:
        result = await _twice(
            f"reclone {standby.name}",
            lambda s=standby: ops.ensure_standby_recloned(view, s, RUN_ID),  # type: ignore[misc]
        )
        assert result.changed
    health = await ops.verify_cluster(view)
    assert health.healthy
    await _twice("staging", lambda: ops.ensure_staging_file_removed(view, BACKUP_ID))
    await _twice("unblock", lambda: ops.ensure_connections_unblocked(view))

    # The outcome, checked with the simulator's own tools (not ours).
    assert cluster.wait_healthy(timeout=30).ok  # the agent reports every 3 s
    wait_for_replay(cluster)
    for vm in cluster.vms:
        got = table_checksums(vm)
        assert got == expected, vm.name
    dump_on_vm = cluster.vm(view.primary.name).host_path(ops.layout.dump_path(BACKUP_ID))
    assert not dump_on_vm.exists()
    ok, err = _host_can_connect(cluster, view.primary.address)
    assert ok, err
    _all_monit_running(cluster)
