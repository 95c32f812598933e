"""Dingo recoveries that must stop before anything destructive, on the simulated cell.

Each case runs the real `pgrecovery recover` against a new instance whose state is recorded
first; afterwards the container still runs, its etcd keys, its data directory and its archive
prefix are exactly as before, and the status names the reason: no archive for the GUID, an
archive without base backups, an archive without `sysids/sysid`, a damaged base backup, an
archive mixing two clusters (a base backup whose system id is not `sysids/sysid`), a gap in
the WAL after the base backup, no container for the instance, a container that archives to
another bucket, a named container of another instance, and a dry run (every check, no
change).
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.dingo.cell import DingoCell
from tests.dingo.world import DeletedService, deleted_service, recover_argv
from tests.objectstores.servers import S3Server

pytestmark = [pytest.mark.integration, pytest.mark.vms, pytest.mark.slow]


@pytest.fixture(scope="module")
def world(dingo_cell: DingoCell, moto_s3: S3Server) -> Iterator[DeletedService]:
    made = deleted_service(dingo_cell, moto_s3)
    yield made
    dingo_cell.delete_instance(made.new)  # its PostgreSQL would run for the whole session


def _snapshot(world: DeletedService) -> dict[str, Any]:
    new = world.new
    return {
        "running": new.state()["Running"],
        "etcd": {
            k: world.cell.etcd_get(k.lstrip("/"))
            for k in world.cell.etcd_keys(new.instance_id)
            if not k.endswith(("/leader", f"/members/{new.container}", "/optime/leader"))
        },
        "archive": new.archive().list_keys(),
        "sysid": new.sysid(),
        "table": new.psql("SELECT count(*) FROM only_in_the_new_instance"),
    }


def _copy(world: DeletedService, guid: str, keep: str) -> None:
    """Copy the old archive's objects whose relative key starts with one of `keep`'s
    comma-separated prefixes to `backups/<guid>/wal/`."""
    client = world.store.client()
    source = world.old.archive()
    for key in source.list_keys():
        rel = key[len(source.prefix) :]
        if rel.startswith(tuple(keep.split(","))):
            client.copy_object(
                Bucket=world.bucket,
                Key=f"backups/{guid}/wal/{rel}",
                CopySource={"Bucket": world.bucket, "Key": key},
            )


def _damage_first_partition(world: DeletedService, guid: str) -> None:
    """Flip one byte in the middle of the latest base backup's first tar partition (its
    lzop block checksums catch it)."""
    client = world.store.client()
    prefix = f"backups/{guid}/wal/basebackups_005/"
    keys = sorted(
        o["Key"]
        for o in client.list_objects_v2(Bucket=world.bucket, Prefix=prefix)["Contents"]
        if o["Key"].endswith("part_00000000.tar.lzo")
    )
    body = bytearray(client.get_object(Bucket=world.bucket, Key=keys[-1])["Body"].read())
    body[len(body) // 2] ^= 0xFF
    client.put_object(Bucket=world.bucket, Key=keys[-1], Body=bytes(body))


def _run(world: DeletedService, tmp_path: Path, name: str, **overrides: Any) -> dict[str, Any]:
    argv, status_file = recover_argv(world, tmp_path, name, **overrides)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    status: dict[str, Any] = json.loads(status_file.read_text())["status"]
    status["_exit"] = result.returncode
    status["_output"] = result.stdout + result.stderr
    return status


@pytest.mark.parametrize(
    ("case", "reason", "words"),
    [
        ("no-archive", "BackupNotFound", "the prefix is empty"),
        ("no-base-backup", "BackupNotFound", "no complete base backup"),
        ("no-sysid", "BackupIncomplete", "sysids/sysid"),
        ("corrupt-base-backup", "BackupCorrupt", "part_00000000.tar.lzo"),
        ("mixed-archive", "SystemIdMismatch", "mixes two clusters"),
        ("wal-gap", "BackupIncomplete", "the archive has a gap"),
        ("no-container", "ContainerNotFound", "no container of service instance"),
        ("other-container", "ContainerMismatch", "belongs to service instance"),
        ("other-bucket", "ArchiveMismatch", "archives to bucket"),
    ],
)
def test_bad_input_fails_in_fetching_and_changes_nothing(
    world: DeletedService, tmp_path: Path, case: str, reason: str, words: str
) -> None:
    before = _snapshot(world)
    guid = str(uuid.uuid4())
    overrides: dict[str, Any] = {}
    if case == "no-archive":
        overrides["backup_guid"] = guid
    elif case == "no-base-backup":
        _copy(world, guid, "wal_005/,sysids/")
        overrides["backup_guid"] = guid
    elif case == "no-sysid":
        _copy(world, guid, "wal_005/,basebackups_005/")
        overrides["backup_guid"] = guid
    elif case == "corrupt-base-backup":
        _copy(world, guid, "")
        _damage_first_partition(world, guid)
        overrides["backup_guid"] = guid
    elif case == "mixed-archive":
        # what `aws s3 sync` into an archive leaves: another cluster's sysids/sysid
        _copy(world, guid, "")
        world.store.client().put_object(
            Bucket=world.bucket,
            Key=f"backups/{guid}/wal/sysids/sysid",
            Body=f"{world.new_sysid}\n".encode(),
        )
        overrides["backup_guid"] = guid
    elif case == "wal-gap":
        # every object but the first WAL segment after the base backup's
        _copy(world, guid, "")
        segments = sorted(
            k
            for k in world.old.archive().list_keys()
            if re.search(r"wal_005/[0-9A-F]{24}\.lzo$", k)
        )
        victim = segments[-2].rsplit("/", 1)[-1]
        world.store.client().delete_object(
            Bucket=world.bucket, Key=f"backups/{guid}/wal/wal_005/{victim}"
        )
        overrides["backup_guid"] = guid
    elif case == "no-container":
        overrides["instance_id"] = guid
    elif case == "other-bucket":
        # the old archive also exists in another bucket, but the new container restores from
        # its own: a clone into the other bucket would never be read
        other = world.store.new_bucket("dingo-other")
        client = world.store.client()
        for key in world.old.archive().list_keys():
            client.copy_object(
                Bucket=other, Key=key, CopySource={"Bucket": world.bucket, "Key": key}
            )
        overrides["bucket"] = other
    else:
        overrides["instance_id"] = guid
        overrides["container"] = world.new.container
    status = _run(world, tmp_path, f"bad-{case}", **overrides)
    assert status["_exit"] != 0
    assert status["phase"] == "Failed", status
    assert status["failureReason"] == reason, status
    assert words in status["message"], status["message"]
    ran = {s["name"]: s["state"] for s in status["steps"]}
    assert not any(name.startswith("ensure-") for name in ran), ran
    assert _snapshot(world) == before


def test_dry_run_checks_everything_and_changes_nothing(
    world: DeletedService, tmp_path: Path
) -> None:
    before = _snapshot(world)
    status = _run(world, tmp_path, "dry-run", dry_run=True)
    assert status["_exit"] == 0, status["_output"][-2000:]
    assert status["phase"] == "Decrypting", status  # the last phase before Staging
    blocked = {c["type"]: c for c in status["conditions"]}["Blocked"]
    assert blocked["reason"] == "DryRunComplete"
    facts = status["facts"]
    assert facts["oldSysid"] == world.old_sysid
    assert facts["newSysid"] == world.new_sysid
    assert facts["container"] == world.new.container
    assert _snapshot(world) == before
