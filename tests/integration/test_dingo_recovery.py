"""Dingo: a deleted service instance's data comes back in a new instance (the Done-when test).

On the simulated cell (real etcd v2, sshd, the docker stand-in whose containers run PostgreSQL
15 with Dingo's restore_leader_if_missing start-up, archives in S3 in WAL-E's layout): an
instance with data is deleted, a new instance is created with its own base backup and system
id, and `pgrecovery recover` (local mode, a real subprocess over SSH) restores the deleted
instance's archive into it. The new instance then holds the old data and the OLD system id.

The second test does the runbook by hand with `aws s3 sync` semantics (copy only what is
missing at the destination) and shows why that is unsafe: the new instance's own base backup
and `sysids/sysid` survive, and what comes back is not the deleted instance's database — the
check the recovery ends with (restored system id == the old archive's) fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.boshdirector.director import Client, DirectorEmulator
from tests.boshdirector.fixtures import CLIENT_ID, cli_environment
from tests.dingo.cell import DingoCell
from tests.dingo.world import DeletedService, deleted_service, recover_argv, table_digest
from tests.objectstores.servers import S3Server

pytestmark = [pytest.mark.integration, pytest.mark.vms, pytest.mark.slow]


def _status(path: Path) -> dict[str, object]:
    return json.loads(path.read_text())["status"]  # type: ignore[no-any-return]


@pytest.fixture
def world(dingo_cell: DingoCell, moto_s3: S3Server) -> Iterator[DeletedService]:
    made = deleted_service(dingo_cell, moto_s3)
    yield made
    dingo_cell.delete_instance(made.new)  # its PostgreSQL would run for the whole session


def test_deleted_instance_is_restored_into_the_new_instance(
    dingo_cell: DingoCell, moto_s3: S3Server, world: DeletedService, tmp_path: Path
) -> None:
    old, new = world.old, world.new
    # the deletion really happened, and the new instance is really a different database
    assert dingo_cell.etcd_keys(old.instance_id) == []
    assert old.container not in dingo_cell.docker("ps", "-a")
    assert world.new_sysid != world.old_sysid
    assert any(k.endswith("sysids/sysid") for k in new.archive().list_keys())
    assert any("_backup_stop_sentinel.json" in k for k in new.archive().list_keys())
    old_keys = {k[len(old.archive().prefix) :] for k in old.archive().list_keys()}

    argv, status_file = recover_argv(world, tmp_path, "dingo-restore")
    started = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    status = _status(status_file)
    assert status["phase"] == "Rejoined", status
    conditions = {c["type"]: c["status"] for c in status["conditions"]}  # type: ignore[attr-defined]
    assert conditions["Succeeded"] == "True"
    facts = status["facts"]
    assert isinstance(facts, dict)
    assert facts["oldSysid"] == world.old_sysid
    assert facts["restoredSysid"] == world.old_sysid
    assert facts["newSysid"] == world.new_sysid
    print(f"dingo recovery took {elapsed:.1f}s: {status['message']}")
    # The final message carries the runbook's last step in Cloud Foundry, for this instance.
    assert f"Next: the data is in service instance {new.instance_id}" in status["message"]
    assert "cf bind-service" in status["message"]
    assert "cf restart" in status["message"]

    # the old data is in the new instance; the new instance's own table is gone
    new.wait_leader()
    assert table_digest(new) == world.old_digest
    assert new.psql("SELECT to_regclass('only_in_the_new_instance') IS NULL") == "t"
    assert new.sysid() == world.old_sysid
    assert dingo_cell.etcd_get(f"service/{new.instance_id}/initialize") == world.old_sysid
    # the new prefix is a copy of the old archive (plus what the restored instance archived
    # since: its new timeline's history and segments), none of the new instance's own objects
    new_keys = {k[len(new.archive().prefix) :] for k in new.archive().list_keys()}
    assert old_keys <= new_keys
    assert all(k.startswith(("wal_005/00000002", "wal_005/00000003")) for k in new_keys - old_keys)
    # the old archive is untouched
    assert {k[len(old.archive().prefix) :] for k in old.archive().list_keys()} == old_keys
    # the restored instance works as a database: it takes writes and archives them
    new.psql("INSERT INTO accounts VALUES (-1, 'after the recovery')")
    new.switch_wal()
    # no secret in what the user saw or what was written down: not the operator's S3 keys,
    # not the SSH key, not the container's S3 keys that `docker inspect` showed the operator
    for secret in world.secret_strings():
        assert secret not in result.stdout + result.stderr + status_file.read_text()

    # running it again changes nothing (a finished recovery never runs again)
    again = subprocess.run(
        [*argv, "--resume"], capture_output=True, text=True, timeout=300, check=False
    )
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert table_digest(new) != world.old_digest  # includes the row written after recovery
    assert new.psql("SELECT v FROM accounts WHERE id = -1") == "after the recovery"


def test_deleted_instance_is_restored_through_the_director(
    dingo_cell: DingoCell, moto_s3: S3Server, world: DeletedService, tmp_path: Path
) -> None:
    """target.bosh for Dingo (issue 21): a recovery file naming no cell and no SSH key, and
    the bosh CLI's BOSH_* variables; the director lists the cell group (instanceGroup not
    given: `cell`), opens the cell with an ephemeral user, and removes it at the end."""
    deployment = dingo_cell.config.deployment
    director = DirectorEmulator({deployment: dingo_cell.vms},
                                clients={CLIENT_ID: Client(os.urandom(12).hex())})
    with director:
        try:
            argv, status_file = recover_argv(world, tmp_path, "dingo-bosh")
            manifest = tmp_path / "dingo-bosh.yaml"
            doc = yaml.safe_load(manifest.read_text())
            doc["spec"]["target"].pop("nodes")
            doc["spec"]["target"].pop("ssh")
            manifest.write_text(yaml.safe_dump(doc))
            env = cli_environment(director, deployment)
            result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900,
                                    check=False)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            status = _status(status_file)
            assert status["phase"] == "Rejoined", status
            facts = status["facts"]
            assert isinstance(facts, dict)
            assert facts["restoredSysid"] == world.old_sysid
            pinned = json.loads(facts["boshInstances"])
            assert [(name, addr) for name, _id, addr in pinned] == [
                (vm.name, vm.address) for vm in dingo_cell.vms]
            world.new.wait_leader()
            assert table_digest(world.new) == world.old_digest
            users = director.ssh_users(deployment)
            assert {vm: [u for u in names if "pgrecovery" in u]
                    for vm, names in users.items()} == {vm.name: [] for vm in dingo_cell.vms}
            assert any(t.description == "ssh: setup" for t in director._tasks.values())
            assert director.clients[CLIENT_ID].secret not in result.stdout + result.stderr
        finally:
            for vm in dingo_cell.vms:
                vm.run("for u in $(awk -F: '$6 ~ \"^/var/vcap/bosh_ssh/\" {print $1}' "
                       '/etc/passwd); do pkill -KILL -u "$u"; userdel -rf "$u"; done',
                       check=False)


def test_a_naive_sync_restores_the_wrong_database(dingo_cell: DingoCell, moto_s3: S3Server) -> None:
    world = deleted_service(dingo_cell, moto_s3)
    old, new = world.old, world.new
    client = moto_s3.client()
    old_prefix, new_prefix = old.archive().prefix, new.archive().prefix
    dingo_cell.docker("stop", new.container)
    # `aws s3 sync old/ new/` without emptying new/ first: objects that exist at the
    # destination are skipped (here: whatever has the same relative key)
    existing = {k[len(new_prefix) :] for k in new.archive().list_keys()}
    for key in old.archive().list_keys():
        rel = key[len(old_prefix) :]
        if rel not in existing:
            client.copy_object(
                Bucket=world.bucket,
                Key=new_prefix + rel,
                CopySource={"Bucket": world.bucket, "Key": key},
            )
    assert "sysids/sysid" in existing  # the new instance's own system id survived the sync
    # the rest of the runbook, exactly
    for key in ("initialize", "optime/leader"):
        dingo_cell.vm.run(
            [
                "curl", "-sS", "-XDELETE",
                f"http://127.0.0.1:2379/v2/keys/service/{new.instance_id}/{key}",
            ]
        )  # fmt: skip
    dingo_cell.vm.run(f"rm -rf {new.data_dir}/*")
    dingo_cell.docker("start", new.container)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        leader = dingo_cell.etcd_get(f"service/{new.instance_id}/leader")
        if leader == new.container or not new.state()["Running"]:
            break
        time.sleep(1)
    # What came back is the NEW instance's database (its base backup and sysid won), not the
    # deleted one's: the recovery's final check (restored sysid == old archive's) fails.
    assert new.state()["Running"], new.logs()[-2000:]
    assert new.sysid() == world.new_sysid
    assert new.sysid() != world.old_sysid
    assert new.psql("SELECT to_regclass('accounts') IS NULL") == "t"
