"""A Dingo "deleted service" story on the simulated cell, and the local recovery command for it.

Why this module exists: the integration tests share one story — an instance with data is
deleted (container removed, etcd keys gone, archive kept), a new instance is created (its own
base backup and system id) — and one way to hand `pgrecovery recover` a Dingo manifest and its
secrets (a directory like mounted Kubernetes Secrets; nothing secret on the command line).
"""

from __future__ import annotations

import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.dingo.cell import DingoCell, Instance
from tests.objectstores.servers import S3Server

S3_SECRET = "dingo-backups-s3"
SSH_SECRET = "dingo-cell-ssh"


@dataclass
class DeletedService:
    """The deleted instance (`old`, whose container and keys are gone) and the new one.
    `operator_keys` are the S3 credentials handed to pgrecovery (moto accepts any)."""

    cell: DingoCell
    store: S3Server
    bucket: str
    old: Instance
    old_sysid: str
    old_digest: str
    new: Instance
    new_sysid: str
    operator_keys: tuple[str, str] = field(
        default_factory=lambda: (
            "AKOPERATOR" + secrets.token_hex(5).upper(),
            "operator-" + secrets.token_urlsafe(24),
        )
    )

    def secret_strings(self) -> list[str]:
        """Values no output, status or command line may show."""
        key_lines = self.cell.client_key_path.read_text().splitlines()
        return [
            self.operator_keys[1],
            self.cell.s3_credentials[1],
            *[line for line in key_lines if line and not line.startswith("-----")][:3],
        ]


def table_digest(inst: Instance) -> str:
    return inst.psql("SELECT count(*) || ':' || md5(string_agg(v, ',' ORDER BY id)) FROM accounts")


def deleted_service(cell: DingoCell, store: S3Server) -> DeletedService:
    """Old instance with data (archived) → `cf delete-service` → new instance with its own
    base backup, system id and a table of its own."""
    bucket = store.new_bucket("dingo")
    old = cell.create_instance(bucket=bucket)
    old.psql(
        "CREATE TABLE accounts (id int PRIMARY KEY, v text);"
        "INSERT INTO accounts SELECT i, md5(i::text) FROM generate_series(1, 2000) i"
    )
    old.switch_wal()  # the data is in the archive, as after Dingo's archive_timeout
    # more data in a later segment: the archive spans several segments after the base backup
    old.psql("INSERT INTO accounts SELECT i, md5(i::text) FROM generate_series(2001, 2500) i")
    old_digest = table_digest(old)
    old.switch_wal()
    old_sysid = old.sysid()
    cell.docker("stop", old.container)
    cell.delete_instance(old)
    new = cell.create_instance(bucket=bucket)
    new.psql(
        "CREATE TABLE only_in_the_new_instance (x int);"
        "INSERT INTO only_in_the_new_instance VALUES (1)"
    )
    new.switch_wal()
    return DeletedService(cell, store, bucket, old, old_sysid, old_digest, new, new.sysid())


def manifest(
    world: DeletedService,
    name: str,
    *,
    backup_guid: str | None = None,
    instance_id: str | None = None,
    container: str | None = None,
    bucket: str | None = None,
    confirm: bool = True,
    dry_run: bool = False,
) -> dict[str, Any]:
    cell = world.cell
    dingo: dict[str, Any] = {"instanceId": instance_id or world.new.instance_id}
    if container is not None:
        dingo["container"] = container
    spec: dict[str, Any] = {
        "source": {
            "type": "walE",
            "backupGuid": backup_guid or world.old.instance_id,
            "s3": {
                "bucket": bucket or world.bucket,
                "region": world.store.region or "us-east-1",
                "endpoint": world.store.endpoint_url,
                "credentialsSecretRef": {"name": S3_SECRET},
            },
        },
        "target": {
            "type": "dingo",
            "deployment": cell.config.deployment,
            "nodes": cell.nodes_spec(),
            "ssh": {
                "user": cell.ssh_user,
                "privateKeySecretRef": {"name": SSH_SECRET, "key": "id_ed25519"},
                "knownHostsSecretRef": {"name": SSH_SECRET, "key": "known_hosts"},
            },
            "dingo": dingo,
        },
        "dryRun": dry_run,
    }
    if confirm:
        spec["confirm"] = cell.config.deployment
    return {
        "apiVersion": "pgrecovery.dev/v1alpha1",
        "kind": "PgRecovery",
        "metadata": {"name": name, "namespace": "pgrecovery"},
        "spec": spec,
    }


def recover_argv(
    world: DeletedService, directory: Path, name: str, **overrides: Any
) -> tuple[list[str], Path]:
    """Write manifest and secrets into `directory`; the `pgrecovery recover` command line and
    the status file it writes."""
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(manifest(world, name, **overrides)))
    secrets = {
        S3_SECRET: {
            "AWS_ACCESS_KEY_ID": world.operator_keys[0].encode(),
            "AWS_SECRET_ACCESS_KEY": world.operator_keys[1].encode(),
        },
        SSH_SECRET: {
            "id_ed25519": world.cell.client_key_path.read_bytes(),
            "known_hosts": world.cell.known_hosts.encode(),
        },
    }
    root = directory / "secrets"
    for secret, keys in secrets.items():
        (root / secret).mkdir(parents=True, exist_ok=True, mode=0o700)
        for key, value in keys.items():
            (root / secret / key).write_bytes(value)
            (root / secret / key).chmod(0o600)
    status = directory / f"{name}.status.json"
    argv = [
        sys.executable, "-m", "pgrecovery.cli", "recover", "-f", str(path),
        "--secrets-dir", str(root), "--status-file", str(status),
        "--work-dir", str(directory / "work"),
    ]  # fmt: skip
    return argv, status
