"""A recovery scenario on the simulated cluster: data, a backup the runbook's way, damage.

Why this module exists: the local-mode tests, the operator end-to-end tests and the demo all
need the same story — write data, take an a9s-style backup into a real object store, change the
data (the accident), then hand pgrecovery a PgRecovery manifest plus its secrets either as a
secrets directory (local mode) or as Kubernetes Secrets (operator). Building it once keeps the
secrets' names and keys identical everywhere.
"""

from __future__ import annotations

import base64
import secrets as pysecrets
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.objectstores.servers import AzuriteServer, S3Server
from tests.simcluster.backup import A9sBackup, make_azure_backup, make_s3_backup
from tests.simcluster.cluster import SimCluster
from tests.simcluster.data import TableDigest, table_checksums, wait_for_replay, write_sample_data

# pg_dumpall --clean --if-exists: the backup replaces databases that still exist (the
# same-deployment case). A dump without --clean cannot restore over existing data; that case
# fails Restoring with the duplicate-key errors named (tested separately).
DUMPALL_ARGS = ("--clean", "--if-exists")

S3_SECRET = "backup-store-s3"
AZURE_SECRET = "backup-store-azure"
KEY_SECRET = "a9s-pg-backup-key"
KEY_KEY = "encryption-key"
SSH_SECRET = "a9s-pg-ssh"


@dataclass
class Scenario:
    cluster: SimCluster
    backup: A9sBackup
    expected: dict[str, TableDigest]
    store: S3Server | AzuriteServer
    deployment: str = "a9s-pg"
    encryption_key: str = field(default="", repr=False)
    _moto_access: str = field(default_factory=lambda: "AKPGR" + pysecrets.token_hex(6).upper())
    _moto_secret: str = field(
        default_factory=lambda: "pgr-s3-" + pysecrets.token_urlsafe(24), repr=False
    )

    # ------------------------------------------------------------------ building

    @classmethod
    def prepare(
        cls,
        cluster: SimCluster,
        store: S3Server | AzuriteServer,
        *,
        rows: int = 500,
        part_size: int | None = None,
        encryption_key: str | None = None,
        dumpall_args: tuple[str, ...] = DUMPALL_ARGS,
        before_backup: Callable[[SimCluster], None] | None = None,
        after_backup: Callable[[SimCluster], None] | None = None,
        edit_dump: Callable[[bytes], bytes] | None = None,
    ) -> Scenario:
        primary = cluster.primary()
        write_sample_data(primary, rows=rows)
        wait_for_replay(cluster)
        expected = table_checksums(primary)
        key = encryption_key or "pgr-" + pysecrets.token_urlsafe(24)
        kwargs: dict[str, Any] = {"dumpall_args": dumpall_args, "encryption_key": key}
        if edit_dump is not None:  # S3 only: the plain dump changed before it is encrypted
            kwargs["edit_dump"] = edit_dump
        if before_backup is not None:
            before_backup(cluster)
        if isinstance(store, S3Server):
            if part_size is not None:
                kwargs["part_size"] = part_size
            backup = make_s3_backup(
                primary,
                endpoint_url=store.endpoint_url,
                bucket=store.new_bucket(),
                access_key_id=store.access_key,
                secret_access_key=store.secret_key,
                region=store.region or "us-east-1",
                **kwargs,
            )
        else:
            container = store.new_container()
            backup = make_azure_backup(
                primary,
                connection_string=store.connection_string,
                container=container,
                create_container=False,
                **kwargs,
            )
        if after_backup is not None:
            after_backup(cluster)
        scenario = cls(cluster, backup, expected, store, encryption_key=key)
        scenario.damage()
        return scenario

    def damage(self) -> None:
        """The accident: rows changed and a table dropped after the backup."""
        primary = self.cluster.primary()
        write_sample_data(primary, rows=37, seed=99, databases=("shop",))
        primary.psql("DROP TABLE IF EXISTS public.orders", database="crm")
        wait_for_replay(self.cluster)
        assert table_checksums(primary) != self.expected

    # ------------------------------------------------------------------ checking

    def restored_everywhere(self) -> dict[str, bool]:
        wait_for_replay(self.cluster, timeout=60)
        return {vm.name: table_checksums(vm) == self.expected for vm in self.cluster.vms}

    # ------------------------------------------------------------------ the manifest

    def manifest(
        self,
        name: str,
        namespace: str = "pgrecovery",
        *,
        confirm: bool = True,
        dry_run: bool = False,
        new_site: bool = False,
        restore_connections: int | None = None,
    ) -> dict[str, Any]:
        source: dict[str, Any] = {
            "type": "a9sLogical",
            "backupGuid": self.backup.guid,
            "encryption": {"keySecretRef": {"name": KEY_SECRET, "key": KEY_KEY}},
        }
        if isinstance(self.store, S3Server):
            source["s3"] = {
                "bucket": self.backup.bucket,
                "region": self.store.region or "us-east-1",
                "endpoint": self.store.endpoint_url,
                "credentialsSecretRef": {"name": S3_SECRET},
            }
        else:
            source["azure"] = {
                "container": self.backup.bucket,
                "credentialsSecretRef": {"name": AZURE_SECRET},
            }
        spec: dict[str, Any] = {
            "source": source,
            "target": {
                "type": "a9sPg",
                "deployment": self.deployment,
                "nodes": self.cluster.nodes_spec(),
                "ssh": {
                    "user": self.cluster.ssh_user,
                    "privateKeySecretRef": {"name": SSH_SECRET, "key": "id_ed25519"},
                    "knownHostsSecretRef": {"name": SSH_SECRET, "key": "known_hosts"},
                },
                "postgresMajorVersion": 15,
                "newSite": new_site,
            },
            "dryRun": dry_run,
        }
        if confirm:
            spec["confirm"] = self.deployment
        if restore_connections is not None:
            spec["parallelism"] = {"restoreConnections": restore_connections}
        return {
            "apiVersion": "pgrecovery.dev/v1alpha1",
            "kind": "PgRecovery",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        }

    # ------------------------------------------------------------------ secrets

    def secret_values(self) -> dict[str, dict[str, bytes]]:
        values: dict[str, dict[str, bytes]] = {
            KEY_SECRET: {KEY_KEY: self.encryption_key.encode()},
            SSH_SECRET: {
                "id_ed25519": self.cluster.client_key_path.read_bytes(),
                "known_hosts": self.cluster.known_hosts.encode(),
            },
        }
        if isinstance(self.store, S3Server):
            access, secret = self.s3_credentials()
            values[S3_SECRET] = {
                "AWS_ACCESS_KEY_ID": access.encode(),
                "AWS_SECRET_ACCESS_KEY": secret.encode(),
            }
        else:
            values[AZURE_SECRET] = {
                "AZURE_STORAGE_CONNECTION_STRING": self.store.connection_string.encode()
            }
        return values

    def write_secrets_dir(self, directory: Path) -> Path:
        """Secrets laid out like mounted Kubernetes Secrets, mode 0600."""
        for secret, keys in self.secret_values().items():
            folder = directory / secret
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            for key, value in keys.items():
                path = folder / key
                path.write_bytes(value)
                path.chmod(0o600)
        return directory

    def kube_secrets(self, namespace: str) -> list[dict[str, Any]]:
        return [
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": secret, "namespace": namespace},
                "type": "Opaque",
                "data": {k: base64.b64encode(v).decode() for k, v in keys.items()},
            }
            for secret, keys in self.secret_values().items()
        ]

    def s3_credentials(self) -> tuple[str, str]:
        """moto accepts any credentials, so give the operator distinctive ones (a leak check
        for "testing" would be meaningless); servers that check signatures get their own."""
        assert isinstance(self.store, S3Server)
        if self.store.kind == "moto":
            return self._moto_access, self._moto_secret
        return self.store.access_key, self.store.secret_key

    def secret_strings(self) -> list[str]:
        """Every secret value a leak check must not find (key, SSH key body, credentials)."""
        found = [self.encryption_key]
        if isinstance(self.store, S3Server):
            found.append(self.s3_credentials()[1])
        else:
            found.append(self.store.account_key)
        key_lines = self.cluster.client_key_path.read_text().splitlines()
        found += [line for line in key_lines if line and not line.startswith("-----")][:3]
        return found


def local_recover_argv(
    scenario: Scenario,
    directory: Path,
    name: str,
    *,
    new_site: bool = False,
    restore_connections: int | None = None,
) -> tuple[list[str], Path]:
    """Write the manifest and the secrets directory for `pgrecovery recover` into `directory`;
    return its command line (secrets never on it) and the status file it will write."""
    manifest = directory / f"{name}.yaml"
    manifest.write_text(
        yaml.safe_dump(
            scenario.manifest(name, new_site=new_site, restore_connections=restore_connections)
        )
    )
    secrets = scenario.write_secrets_dir(directory / "secrets")
    status_file = directory / f"{name}.status.json"
    argv = [
        sys.executable, "-m", "pgrecovery.cli", "recover", "-f", str(manifest),
        "--secrets-dir", str(secrets), "--status-file", str(status_file),
        "--work-dir", str(directory / "work"),
    ]
    return argv, status_file


def leftover_scan(cluster: SimCluster, work_root: Path, *, dump_of: str | None) -> list[str]:
    """pgrecovery's files on every VM — its whole state directory (jobs, journal, restore work,
    markers) and clone markers — the staged dump of backup `dump_of` (None: the recovery stages
    none, as WAL-E), and the work volume: what must be gone after a success. Other files in the
    staging directory are not pgrecovery's to remove (people stage dumps there by hand, and
    other tests share the cluster), so only the recovery's own dump is looked for."""
    staged = (f"find /var/vcap/store/postgresql-restore -name {shlex.quote(dump_of + '*')} "
              "2>/dev/null; " if dump_of else "")
    found: list[str] = []
    for vm in cluster.vms:
        # The staging directory only through `staged`: a staged dump's marker
        # (`<id>.dump.pgrecovery.json`) has pgrecovery in its name, but another recovery's is
        # not this one's to remove.
        out = vm.run(
            "find /var/vcap/store -path '*pgrecovery*' "
            "-not -path '/var/vcap/store/postgresql-restore/*' 2>/dev/null; " + staged + "true"
        ).stdout.split()
        found += [f"{vm.name}:{path}" for path in out]
    if work_root.exists():
        found += [str(p) for p in work_root.rglob("*") if p.is_file()]
    return found


# A real restore error in Restoring: a table in `postgres` that the application role comes to
# own after the backup makes the --clean dump's `DROP ROLE shop_owner` fail ("cannot be dropped
# because some objects depend on it"), an error not on the expected list.
OWNED_IN_POSTGRES = "public.pgr_owned_by_app_role"


def role_owns_an_object_in_postgres(cluster: SimCluster) -> None:
    cluster.primary().psql(f"CREATE TABLE {OWNED_IN_POSTGRES} (id int); "
                           f"ALTER TABLE {OWNED_IN_POSTGRES} OWNER TO shop_owner;")


def drop_the_object_owned_in_postgres(cluster: SimCluster) -> None:
    cluster.primary().psql(f"DROP TABLE IF EXISTS {OWNED_IN_POSTGRES}")
