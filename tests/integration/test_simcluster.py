"""The simulated a9s-pg cluster itself: what the operator's integration and end-to-end tests
rely on (issue 4, "Test world").

Checks that the cluster comes up healthy, that SSH verifies host keys, that the VM layout
matches an a9s-pg node, that the fault controls do what they say, that teardown (also after a
failed bring-up, also of a crashed run's leftovers) leaves nothing, and that the a9s-style
backup helper produces what the runbook can restore.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from azure.storage.blob import BlobServiceClient
from moto.server import ThreadedMotoServer

from tests.objectstores.servers import AzuriteServer
from tests.simcluster import (
    ClusterConfig,
    ClusterInUse,
    SimCluster,
    SimClusterError,
    SimVM,
    backup,
    clean_stale,
    cluster_show,
    data,
    host,
    parse_cluster_show,
    parse_monit_summary,
    streaming_standbys,
    table_checksums,
    teardown,
    wait_for_replay,
    write_sample_data,
)
from tests.simcluster.fixtures import skip_unless_simcluster_possible
from tests.simcluster.render import JOB_DIR, MONIT, PGDATA, RESTORE_DIR, STARTUP_LOCK_DIR

pytestmark = [pytest.mark.integration, pytest.mark.vms]


@pytest.fixture(autouse=True)
def _needs_simcluster() -> None:
    """Skip (with the reason) where the simulator cannot run, e.g. without root."""
    skip_unless_simcluster_possible()


REPO = Path(__file__).resolve().parents[2]

# Clusters besides the session one get their own names and subnets, so they never touch it.
SCRATCH = ClusterConfig(name="pgsimt", subnet="10.77.1")
CLI_CLUSTER = ClusterConfig(name="pgsimc", subnet="10.77.2")


def _traces(config: ClusterConfig) -> list[str]:
    """Everything of cluster `config` still present on the host."""
    found = []
    if ns := host.list_netns(f"{config.name}-"):
        found.append(f"netns {ns}")
    if mounts := host.mounts_under(config.root):
        found.append(f"mounts {mounts}")
    if pids := host.pids_mentioning(str(config.root) + "/"):
        found.append(f"processes {pids}")
    if config.root.exists():
        found.append(f"directory {config.root}")
    links = [config.bridge] + [config.host_veth(i) for i in range(config.vms)]
    found += [f"link {link}" for link in links if host.link_exists(link)]
    return found


def _vm_pids(cluster: SimCluster) -> set[int]:
    pids: set[int] = set()
    for vm in cluster.vms:
        pids.update(host.pids_in_netns(vm.netns))
    return pids


def _ssh(
    cluster: SimCluster, vm: str, *remote: str, known_hosts: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cluster.ssh_argv(vm, *remote, known_hosts=known_hosts),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


# ---------------------------------------------------------------------------- healthy cluster
def test_cluster_comes_up_healthy(healthy_sim_cluster: SimCluster) -> None:
    # healthy_: other tests share the session cluster and may leave it mid-recovery
    sim_cluster = healthy_sim_cluster
    primary = sim_cluster.primary()
    assert primary.name == "pg/0"
    rc, text = cluster_show(primary)
    assert rc == 0, text
    nodes = parse_cluster_show(text)
    primaries = [n for n in nodes if n.role == "primary"]
    standbys = [n for n in nodes if n.role == "standby"]
    assert [(n.name, n.status) for n in primaries] == [("pg-0", "* running")]
    assert sorted((n.name, n.status, n.upstream) for n in standbys) == [
        ("pg-1", "running", "pg-0"),
        ("pg-2", "running", "pg-0"),
    ]
    assert {n.host for n in nodes} == {vm.address for vm in sim_cluster.vms}

    streaming = streaming_standbys(primary)
    assert sorted(r.client_addr for r in streaming) == [
        sim_cluster.vm("pg/1").address,
        sim_cluster.vm("pg/2").address,
    ]
    # Streaming through replication slots, one per standby.
    assert data.replication_slots(primary) == {"repmgr_slot_2": True, "repmgr_slot_3": True}
    assert [vm.agent_state() for vm in sim_cluster.vms] == ["running"] * 3
    assert sim_cluster.wait_healthy(timeout=30).ok


def test_replication_carries_writes(healthy_sim_cluster: SimCluster) -> None:
    primary = healthy_sim_cluster.primary()
    write_sample_data(primary, rows=200, databases=("simcheck",))
    wait_for_replay(healthy_sim_cluster)
    sums = [table_checksums(vm, ["simcheck"]) for vm in healthy_sim_cluster.vms]
    assert sums[0] == sums[1] == sums[2]
    assert {d.rows for d in sums[0].values()} == {200}
    primary.psql("DROP DATABASE simcheck WITH (FORCE)")


def test_vm_layout_is_an_a9s_pg_node(healthy_sim_cluster: SimCluster) -> None:
    for vm in healthy_sim_cluster.vms:
        checks = vm.run(
            f"""
            set -e
            test -f {JOB_DIR}/helpers/vars.sh
            grep -q '^register_master_node()' {JOB_DIR}/helpers/repmgr_utils.sh
            test -x {JOB_DIR}/bin/pre-start
            grep -q 'ALTER ROLE repmgr' {JOB_DIR}/data/create_or_update_roles_and_databases.sql
            test -s {PGDATA}/PG_VERSION
            # pgrecovery removes the staging dir after a recovery, as the runbook asks
            test -d {RESTORE_DIR} || test -d /var/vcap/store
            test -d {STARTUP_LOCK_DIR}
            test -x /var/vcap/bosh/bin/monit
            stat -c %a /var/vcap/bosh/etc/monitrc
            grep -q 'set httpd port 2822 and use address 127.0.0.1' /var/vcap/bosh/etc/monitrc
            grep -q 'include /var/vcap/monit/job/\\*.monitrc' /var/vcap/bosh/etc/monitrc
            grep -q 'depends on postgresql-ha' /var/vcap/monit/job/*.monitrc
            hostname
            ! touch /usr/pgsim-probe 2>/dev/null
            ! ip route | grep -q default
            findmnt -n -o FSTYPE /etc
            ps -o user=,group= -C postgres | sort -u
            ps -o user=,group= -C repmgrd | sort -u
            getent passwd {healthy_sim_cluster.ssh_user} | cut -d: -f7
            """
        ).stdout.split("\n")
        assert checks[0] == "600", f"{vm.name}: monitrc mode"
        assert checks[1] == vm.hostname
        assert checks[2] == "overlay"
        assert checks[3].split() == ["postgres", "vcap"]
        assert checks[4].split() == ["postgres", "vcap"]
        assert checks[5] == "/bin/bash"


def test_vms_are_isolated_from_each_other(healthy_sim_cluster: SimCluster) -> None:
    a, b = healthy_sim_cluster.vm("pg/1"), healthy_sim_cluster.vm("pg/2")
    a.run("echo only-on-a > /etc/pgsim-isolation-probe; echo a > /tmp/probe; echo a > /root/p")
    try:
        out = b.run("cat /etc/pgsim-isolation-probe /tmp/probe /root/p 2>&1 || true").stdout
        assert "only-on-a" not in out
        # Each VM sees its own processes only: PID 1 is its init.
        assert "init.sh" in b.run("cat /proc/1/cmdline").stdout
        assert int(b.run("ps -e --no-headers | wc -l").stdout) < 60
    finally:
        a.run("rm -f /etc/pgsim-isolation-probe /tmp/probe /root/p")


# ---------------------------------------------------------------------------- SSH
def test_ssh_with_host_key_verification(healthy_sim_cluster: SimCluster, tmp_path: Path) -> None:
    keys = healthy_sim_cluster.known_hosts.splitlines()
    assert len({line.split(" ", 1)[1] for line in keys}) == 3, "each VM has its own host key"
    assert stat.S_IMODE(healthy_sim_cluster.client_key_path.stat().st_mode) == 0o600

    for vm in healthy_sim_cluster.vms:
        proc = _ssh(
            healthy_sim_cluster,
            vm.name,
            "id -un; sudo -n /var/vcap/bosh/bin/monit summary; sudo -n id -u",
        )
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0] == healthy_sim_cluster.ssh_user
        assert lines[-1] == "0", "passwordless sudo to root"
        services = parse_monit_summary(proc.stdout)
        assert services["postgresql-ha"].status == "OK"

    # Keys shifted by one line: every VM presents a key the file assigns to another VM.
    addresses = [line.split(" ", 1)[0] for line in keys]
    rotated = keys[1:] + keys[:1]
    shifted = [
        f"{addr} {line.split(' ', 1)[1]}" for addr, line in zip(addresses, rotated, strict=True)
    ]
    wrong = tmp_path / "known_hosts_wrong"
    wrong.write_text("\n".join(shifted) + "\n")
    proc = _ssh(healthy_sim_cluster, "pg/0", "true", known_hosts=wrong)
    assert proc.returncode == 255
    assert "Host key verification failed" in proc.stderr

    empty = tmp_path / "known_hosts_empty"
    empty.write_text("")
    proc = _ssh(healthy_sim_cluster, "pg/1", "true", known_hosts=empty)
    assert proc.returncode == 255
    assert "Host key verification failed" in proc.stderr


def test_password_and_root_logins_are_refused(healthy_sim_cluster: SimCluster) -> None:
    vm = healthy_sim_cluster.vm("pg/0")
    argv = healthy_sim_cluster.ssh_argv(vm, "true")
    root = [a if not a.endswith(f"@{vm.address}") else f"root@{vm.address}" for a in argv]
    proc = subprocess.run(root, capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 255
    no_key = [a for a in argv if a not in ("-i", str(healthy_sim_cluster.client_key_path))]
    no_key += ["-o", "PreferredAuthentications=password"]
    proc = subprocess.run(no_key, capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 255


# ---------------------------------------------------------------------------- monit and agent
def test_monit_summary_parses(healthy_sim_cluster: SimCluster) -> None:
    for vm in healthy_sim_cluster.vms:
        services = parse_monit_summary(vm.monit_summary())
        assert services["postgresql-ha"].status == "OK"
        assert services["postgresql-ha"].type == "Process"
        assert services["repmgr"].status == "OK"
        assert services[vm.hostname].type == "System"


def test_agent_reports_failing_while_a_job_is_down(healthy_sim_cluster: SimCluster) -> None:
    vm = healthy_sim_cluster.vm("pg/2")
    vm.monit("stop", "repmgr", check=True)
    deadline = time.monotonic() + 20
    while not vm.agent_state().startswith("failing"):
        assert time.monotonic() < deadline, vm.agent_state()
        time.sleep(0.1)
    vm.monit("start", "repmgr", check=True)
    vm.wait_agent("running", timeout=30)


def test_startup_lock_naming_a_live_process_blocks_start(healthy_sim_cluster: SimCluster) -> None:
    vm = healthy_sim_cluster.vm("pg/1")
    vm.monit("stop", "postgresql-ha", check=True)
    deadline = time.monotonic() + 30
    while vm.monit_status().get("postgresql-ha") != "Not monitored":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # PID 1 (the VM's init) is alive: exactly the runbook's "recycled PID" situation.
    vm.run(f"echo 1 > {STARTUP_LOCK_DIR}/postgresql-ha.lock")
    proc = vm.run(f"{JOB_DIR}/bin/postgresql-ha_ctl start", check=False)
    assert proc.returncode == 1
    log = vm.run("tail -n 3 /var/vcap/sys/log/postgresql-ha/postgresql-ha_ctl.log").stdout
    assert "refusing to start" in log
    assert vm.run(f"cat {STARTUP_LOCK_DIR}/postgresql-ha.lock").stdout.strip() == "1"

    vm.run(f"rm -f {STARTUP_LOCK_DIR}/*")
    vm.monit("start", "postgresql-ha", check=True)
    vm.monit("start", "repmgr", check=True)
    healthy_sim_cluster.wait_healthy(timeout=60)


# ---------------------------------------------------------------------------- faults
def test_power_cut_standby_comes_back_and_rejoins(healthy_sim_cluster: SimCluster) -> None:
    cluster = healthy_sim_cluster
    primary = cluster.primary()
    vm = cluster.vm("pg/2")
    primary.psql("CREATE TABLE IF NOT EXISTS powercut (n int); TRUNCATE powercut;")
    primary.psql("INSERT INTO powercut SELECT generate_series(1, 100)")

    vm.power_cut()
    assert not vm.running
    assert "pg/2: powered off" in cluster.health().problems
    # The cluster goes on without it; data written now must reach it after the reboot.
    primary.psql("INSERT INTO powercut SELECT generate_series(101, 300)")

    started = time.monotonic()
    vm.boot()
    cluster.wait_healthy(timeout=60)
    assert time.monotonic() - started < 30
    wait_for_replay(cluster)
    assert vm.psql("SELECT count(*) FROM powercut") == "300"
    assert vm.is_primary() is False
    primary.psql("DROP TABLE powercut")


def test_fail_over_to_a_standby_and_back(healthy_sim_cluster: SimCluster) -> None:
    cluster = healthy_sim_cluster
    write_sample_data(cluster.primary(), rows=100, databases=("fotest",))
    try:
        cluster.fail_over("pg/1")
        primary = cluster.primary()
        assert primary.name == "pg/1"
        nodes = parse_cluster_show(cluster_show(primary)[1])
        assert {n.name: (n.role, n.upstream) for n in nodes} == {
            "pg-0": ("standby", "pg-1"),
            "pg-1": ("primary", ""),
            "pg-2": ("standby", "pg-1"),
        }
        wait_for_replay(cluster)
        sums = [table_checksums(vm, ["fotest"]) for vm in cluster.vms]
        assert sums[0] == sums[1] == sums[2]
        assert len(sums[0]) == 3
    finally:
        cluster.fail_over("pg/0")
    cluster.primary().psql("DROP DATABASE fotest WITH (FORCE)")


def test_silent_power_cut_and_reboot(healthy_sim_cluster: SimCluster) -> None:
    vm = healthy_sim_cluster.vm("pg/1")
    vm.power_cut(silent=True)
    assert not vm.running
    vm.boot()
    healthy_sim_cluster.wait_healthy(timeout=60)


def test_sshd_stop_and_start(healthy_sim_cluster: SimCluster) -> None:
    vm = healthy_sim_cluster.vm("pg/1")
    vm.stop_sshd()
    assert not vm.sshd_running()
    proc = _ssh(healthy_sim_cluster, vm.name, "true")
    assert proc.returncode == 255
    assert "refused" in proc.stderr
    vm.start_sshd()
    assert vm.sshd_running()
    assert _ssh(healthy_sim_cluster, vm.name, "true").returncode == 0


def test_network_cut_and_restore(healthy_sim_cluster: SimCluster) -> None:
    vm = healthy_sim_cluster.vm("pg/2")
    vm.cut_network()
    try:
        argv = healthy_sim_cluster.ssh_argv(vm, "true")
        argv[argv.index("ConnectTimeout=5")] = "ConnectTimeout=2"
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        assert proc.returncode == 255
        assert "timed out" in proc.stderr
        # Nor can the VM reach its peers.
        primary = healthy_sim_cluster.vm("pg/0").address
        reach = vm.run(f"timeout 3 bash -c '</dev/tcp/{primary}/5432'", check=False)
        assert reach.returncode != 0
    finally:
        vm.restore_network()
    assert _ssh(healthy_sim_cluster, vm.name, "true").returncode == 0
    healthy_sim_cluster.wait_healthy(timeout=60)


def test_store_free_space_can_be_limited(healthy_sim_cluster: SimCluster) -> None:
    vm = healthy_sim_cluster.vm("pg/1")
    vm.limit_store_free_space(2 * 1024 * 1024)
    try:
        avail = int(vm.run("df --output=avail -B1 /var/vcap/store | tail -1").stdout)
        assert avail <= 2 * 1024 * 1024 + 8192
        proc = vm.run(f"dd if=/dev/zero of={RESTORE_DIR}/fill bs=1M count=8 2>&1", check=False)
        assert proc.returncode != 0
        assert "No space left on device" in proc.stdout
    finally:
        vm.run(f"rm -f {RESTORE_DIR}/fill")
        vm.reset_store_size()
    total = int(vm.run("df --output=size -B1 /var/vcap/store | tail -1").stdout)
    assert total == healthy_sim_cluster.config.store_size_bytes


# ---------------------------------------------------------------------------- the runbook
def _sudo(cluster: SimCluster, vm: str, script: str) -> str:
    """Run `script` as root through `ssh` + `sudo -n bash -s` (as an operator would)."""
    proc = subprocess.run(
        cluster.ssh_argv(vm, "sudo -n bash -euo pipefail -s"),
        input=script,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"{vm}: {proc.stderr}"
    return proc.stdout


def _wait_monit(vm: SimVM, service: str, status: str) -> None:
    deadline = time.monotonic() + 60
    while (current := vm.monit_status().get(service)) != status:
        assert time.monotonic() < deadline, f"{vm.name} {service}: {current}"
        time.sleep(0.2)


def test_manual_runbook_restores_a_backup_over_ssh(
    healthy_sim_cluster: SimCluster, tmp_path: Path
) -> None:
    """The runbook, step by step, over SSH: the simulator supports the operator's main path."""
    cluster = healthy_sim_cluster
    primary = cluster.primary()
    standbys = [vm for vm in cluster.vms if vm is not primary]
    write_sample_data(primary, rows=500, databases=("rbshop", "rbcrm"))
    before = table_checksums(primary, ["rbshop", "rbcrm"])
    files = backup.write_backup_files(
        primary,
        backup_id=f"{backup.new_guid()}-1700000000000",
        encryption_key="runbook-key",
        directory=tmp_path,
        part_size=30_000,
    )
    # Disaster: one database gone, the other damaged.
    primary.psql("DROP DATABASE rbshop WITH (FORCE)")
    primary.psql("DELETE FROM public.orders", database="rbcrm")
    primary.psql("DROP DATABASE rbcrm WITH (FORCE)")

    key_file = tmp_path / "key"
    key_file.write_text("runbook-key")
    dump = tmp_path / "restore.dump"
    dump.write_bytes(_runbook_decrypt(list(files.files), key_file))
    sftp = [
        "sftp",
        "-i",
        str(cluster.client_key_path),
        "-o",
        f"UserKnownHostsFile={cluster.known_hosts_path}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-b",
        "-",
        f"{cluster.ssh_user}@{primary.address}",
    ]
    subprocess.run(
        sftp, input=f"put {dump} {RESTORE_DIR}/restore.dump\n", text=True, check=True, timeout=60
    )

    vars_sh = f"source {JOB_DIR}/helpers/vars.sh"
    for vm in standbys:
        _sudo(cluster, vm.name, f"{MONIT} stop postgresql-ha")
    for vm in standbys:
        _wait_monit(vm, "repmgr", "Not monitored")
        _wait_monit(vm, "postgresql-ha", "Not monitored")
    _sudo(cluster, primary.name, f"{MONIT} stop repmgr")
    _wait_monit(primary, "repmgr", "Not monitored")
    _sudo(
        cluster,
        primary.name,
        f"""{vars_sh}
        chpst -u postgres:vcap psql -X postgres -c "SELECT pg_drop_replication_slot(slot_name)
            FROM pg_replication_slots WHERE active <> 't'"
        chpst -u postgres:vcap psql -X postgres -c "SELECT pg_terminate_backend(pid)
            FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
        rm -f {STARTUP_LOCK_DIR}/*
        chpst -u postgres:vcap psql -X --quiet postgres < {RESTORE_DIR}/restore.dump
        chpst -u postgres:vcap psql -X repmgr_cluster -c "DO \\$\\$ DECLARE r record; BEGIN
            FOR r IN (SELECT tablename FROM pg_tables WHERE schemaname = 'repmgr') LOOP
            EXECUTE 'TRUNCATE repmgr.' || quote_ident(r.tablename) || ' CASCADE';
            END LOOP; END \\$\\$;"
        chpst -u postgres:vcap bash -c 'source {JOB_DIR}/helpers/vars.sh;
            source {JOB_DIR}/helpers/repmgr_utils.sh; register_master_node;'
        {MONIT} start repmgr
        """,  # noqa: S608 - fixed runbook text with constant paths
    )
    for vm in standbys:
        _sudo(
            cluster,
            vm.name,
            f"""rm -r {PGDATA}/*
            {JOB_DIR}/bin/pre-start
            {MONIT} start postgresql-ha
            {MONIT} start repmgr
            """,
        )
    cluster.wait_healthy(timeout=90)
    _sudo(cluster, primary.name, f"rm -f {RESTORE_DIR}/restore.dump")
    wait_for_replay(cluster)
    for vm in cluster.vms:
        assert table_checksums(vm, ["rbshop", "rbcrm"]) == before, vm.name
    primary.psql("DROP DATABASE rbshop WITH (FORCE); DROP DATABASE rbcrm WITH (FORCE)")


# ---------------------------------------------------------------------------- teardown
def test_teardown_leaves_nothing_behind() -> None:
    cluster = SimCluster(SCRATCH)
    try:
        cluster.up()
        pids = _vm_pids(cluster)
        assert len(pids) > 20
        assert _traces(SCRATCH) != []
    finally:
        cluster.down()
    assert _traces(SCRATCH) == []
    assert [p for p in pids if host.alive(p)] == []


def test_failed_bring_up_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: SimCluster, *, timeout: float = 0) -> None:
        raise SimClusterError("injected failure after boot")

    monkeypatch.setattr(SimCluster, "wait_healthy", broken)
    cluster = SimCluster(SCRATCH)
    with pytest.raises(SimClusterError, match="injected failure"):
        cluster.up()
    assert _traces(SCRATCH) == []


@pytest.fixture
def cli_cluster() -> Iterator[ClusterConfig]:
    yield CLI_CLUSTER
    teardown(CLI_CLUSTER, force=True)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.simcluster", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_cli_up_status_and_stale_cleanup(cli_cluster: ClusterConfig) -> None:
    opts = ("--name", cli_cluster.name, "--subnet", cli_cluster.subnet)
    up = _cli("up", *opts)
    assert up.returncode == 0, up.stderr
    ssh_line = next(line for line in up.stdout.splitlines() if ": ssh " in line)
    assert ssh_line.split()[0] == "pg/0"
    ssh_cmd = ssh_line.split(": ", 1)[1]
    proc = subprocess.run(
        f"{ssh_cmd} sudo -n true",
        shell=True,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr

    status = _cli("status", *opts)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "healthy" in status.stdout

    # The CLI has exited but its keeper owns the cluster: no one else may clean it away.
    with pytest.raises(ClusterInUse):
        clean_stale(cli_cluster)
    with pytest.raises(ClusterInUse):
        SimCluster(cli_cluster).up(lock_wait_s=0)
    assert _ssh_ok(SimCluster.attach(cli_cluster.name), "pg/1")

    # Owner dead (as after a crash): the VMs are stale leftovers, and clean_stale removes them.
    keeper = [p for p in host.pids_mentioning(str(cli_cluster.root) + "/") if _is_keeper(p)]
    assert len(keeper) == 1
    host.kill_and_wait(keeper)
    removed = clean_stale(cli_cluster)
    assert any("killed" in r for r in removed)
    assert _traces(cli_cluster) == []
    down = _cli("down", *opts)
    assert down.returncode == 0
    assert "nothing to remove" in down.stdout


def test_cli_down_removes_a_running_cluster(cli_cluster: ClusterConfig) -> None:
    opts = ("--name", cli_cluster.name, "--subnet", cli_cluster.subnet)
    assert _cli("up", *opts).returncode == 0
    down = _cli("down", *opts)
    assert down.returncode == 0
    assert "killed" in down.stdout
    assert _traces(cli_cluster) == []


def _is_keeper(pid: int) -> bool:
    return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"simcluster-keeper")


def _ssh_ok(cluster: SimCluster, vm: str) -> bool:
    return _ssh(cluster, vm, "true").returncode == 0


# ---------------------------------------------------------------------------- backups
@pytest.fixture
def moto_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    address, port = server.get_host_and_port()
    try:
        yield f"http://{address}:{port}"
    finally:
        server.stop()


def _runbook_decrypt(files: list[Path], key_file: Path, digest: str = "md5") -> bytes:
    """The runbook's `cat $(ls -1v …) | openssl enc -d … | gunzip -c`, key from a file."""
    names = " ".join(str(f) for f in files)
    proc = subprocess.run(
        f"cat $(ls -1v {names}) | openssl enc -aes256 -md {digest} -d -pass file:{key_file}"
        " | gunzip -c",
        shell=True,
        capture_output=True,
        timeout=60,
        check=True,
    )
    return proc.stdout


def test_s3_backup_in_a9s_layout(
    healthy_sim_cluster: SimCluster, moto_endpoint: str, tmp_path: Path
) -> None:
    primary = healthy_sim_cluster.primary()
    write_sample_data(primary, rows=3000, databases=("bkshop",))
    key = "NYHD8MVmA55HEqoaYHpQaxfwEMcQ1wkI"
    result = backup.make_s3_backup(
        primary,
        endpoint_url=moto_endpoint,
        bucket="a9s-backups",
        access_key_id="test",
        secret_access_key="test",
        encryption_key=key,
        part_size=40_000,
    )
    guid, ts = result.backup_id.rsplit("-", 1)
    assert guid == result.guid
    assert len(ts) == 13
    assert int(ts) == result.timestamp_ms
    assert len(result.parts) >= 3
    assert result.part_keys == [f"{result.backup_id}-{i}" for i in range(len(result.parts))]
    assert all(p.size == 40_000 for p in result.parts[:-1])
    assert sum(p.size for p in result.parts) == result.ciphertext_size

    s3 = boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    )
    listed = {o["Key"]: o["Size"] for o in s3.list_objects_v2(Bucket="a9s-backups")["Contents"]}
    assert listed.keys() == {*result.part_keys, f"{result.backup_id}.json"}
    files = []
    for part in result.parts:
        assert listed[part.key] == part.size
        target = tmp_path / part.key
        s3.download_file("a9s-backups", part.key, str(target))
        files.append(target)
    assert files[0].read_bytes().startswith(b"Salted__")
    assert not files[1].read_bytes().startswith(b"Salted__")

    key_file = tmp_path / "key"
    key_file.write_text(key)
    dump = _runbook_decrypt(files, key_file)
    assert hashlib.sha256(dump).hexdigest() == result.plain_sha256
    assert len(dump) == result.plain_size
    assert b"CREATE DATABASE bkshop" in dump
    primary.psql("DROP DATABASE bkshop WITH (FORCE); DROP ROLE bkshop_owner;")


def test_backup_key_never_on_a_command_line(
    healthy_sim_cluster: SimCluster, tmp_path: Path
) -> None:
    primary = healthy_sim_cluster.primary()
    key = "k3y-that-must-not-leak-" + os.urandom(4).hex()
    seen: list[bytes] = []
    stop = time.monotonic() + 60
    done = threading.Event()

    def watch() -> None:
        while not done.is_set() and time.monotonic() < stop:
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    with contextlib.suppress(OSError):
                        seen.append(Path(f"/proc/{pid}/cmdline").read_bytes())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        files = backup.write_backup_files(
            primary,
            backup_id=f"{backup.new_guid()}-1700000000000",
            encryption_key=key,
            directory=tmp_path / "out",
            part_size=None,
        )
    finally:
        done.set()
        watcher.join()
    assert any(b"openssl" in c for c in seen), "the watcher saw the pipeline run"
    assert not any(key.encode() in c for c in seen)
    key_file = tmp_path / "key"
    key_file.write_text(key)
    assert hashlib.sha256(_runbook_decrypt(list(files.files), key_file)).hexdigest() == (
        files.plain_sha256
    )


def test_backup_with_sha256_digest_and_prefix(
    healthy_sim_cluster: SimCluster, moto_endpoint: str, tmp_path: Path
) -> None:
    result = backup.make_s3_backup(
        healthy_sim_cluster.primary(),
        endpoint_url=moto_endpoint,
        bucket="other-bucket",
        access_key_id="test",
        secret_access_key="test",
        encryption_key="k",
        digest="sha256",
        prefix="backups/",
        guid="de2fe9e4-6535-423d-8709-dca87df7985c",
        timestamp_ms=1740130000000,
    )
    assert result.backup_id == "de2fe9e4-6535-423d-8709-dca87df7985c-1740130000000"
    assert result.part_keys == [f"backups/{result.backup_id}-0"]
    assert result.metadata_key == f"backups/{result.backup_id}.json"
    s3 = boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    )
    target = tmp_path / "part"
    s3.download_file("other-bucket", result.part_keys[0], str(target))
    key_file = tmp_path / "key"
    key_file.write_text("k")
    dump = _runbook_decrypt([target], key_file, digest="sha256")
    assert hashlib.sha256(dump).hexdigest() == result.plain_sha256


def test_azure_backup_is_one_blob(
    healthy_sim_cluster: SimCluster, azurite: AzuriteServer, tmp_path: Path
) -> None:
    # `azurite` is the object-store fixture of tests/objectstores (registered in conftest).
    connection_string = azurite.connection_string
    result = backup.make_azure_backup(
        healthy_sim_cluster.primary(),
        connection_string=connection_string,
        container="a9s-backups",
        encryption_key="azure-key",
    )
    assert result.storage == "azure"
    assert result.part_keys == [result.backup_id]
    container = BlobServiceClient.from_connection_string(connection_string).get_container_client(
        "a9s-backups"
    )
    assert [b.name for b in container.list_blobs()] == [result.backup_id]
    target = tmp_path / result.backup_id
    target.write_bytes(container.download_blob(result.backup_id).readall())
    key_file = tmp_path / "key"
    key_file.write_text("azure-key")
    assert hashlib.sha256(_runbook_decrypt([target], key_file)).hexdigest() == result.plain_sha256
