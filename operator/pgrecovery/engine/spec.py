"""The typed model of a PgRecovery spec (and of a local recovery file).

Why this module exists: the resource is parsed into this model before anything else happens,
and below the handlers nothing touches raw dicts. The CRD schema rejects most bad input at the
API server; this model is the second wall (the API emulator and local files are not validated
by a server) and the one the engine trusts. Every string that may reach a remote command or SQL
is constrained by a pattern here, mirroring the CRD, so quoting is a third wall, not the only one.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pgrecovery.errors import InvalidSpec

# Patterns shared with crds/pgrecovery.yaml (a unit test checks they are identical).
GUID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
BACKUP_ID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}-[0-9]{13}$"
NODE_NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,62}/[0-9]{1,3}$"
# IPv4 dotted quad, bracket-free IPv6, or a DNS name. No spaces, quotes, `$`, `;` possible.
ADDRESS_PATTERN = (
    r"^(([0-9]{1,3}\.){3}[0-9]{1,3}"
    r"|[0-9a-fA-F:]*:[0-9a-fA-F:.]+"
    r"|[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?(\.[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)*)$"
)
DEPLOYMENT_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"
SSH_USER_PATTERN = r"^[a-z_][a-z0-9_-]{0,31}$"
K8S_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]{1,253}$"  # noqa: S105 - a pattern, not a secret
BUCKET_PATTERN = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"
CONTAINER_PATTERN = r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$"
PREFIX_PATTERN = r"^[A-Za-z0-9_./-]{0,512}$"
REGION_PATTERN = r"^[a-z0-9-]{1,32}$"
URL_PATTERN = r"^https?://[A-Za-z0-9.:\[\]_-]+(/[A-Za-z0-9._~/-]*)?$"
# Dingo: docker's container-name rule, and an etcd client URL without a path.
CONTAINER_NAME_PATTERN = r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$"
ETCD_ENDPOINT_PATTERN = r"^https?://[A-Za-z0-9.-]+:[0-9]{1,5}$"
# BOSH: the director's URL (https only: TLS is verified against caCertSecretRef), an instance
# group name as in a deployment manifest.
DIRECTOR_PATTERN = r"^https://[A-Za-z0-9.:\[\]_-]+(:[0-9]{1,5})?/?$"
INSTANCE_GROUP_PATTERN = r"^[a-z][a-z0-9_-]{0,62}$"


class _Model(BaseModel):
    """camelCase on the wire, snake_case in Python, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=lambda name: re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), name),
        populate_by_name=True,
        extra="forbid",
        frozen=True,
    )


K8sName = Annotated[str, Field(pattern=K8S_NAME_PATTERN, max_length=253)]
SecretKey = Annotated[str, Field(pattern=SECRET_KEY_PATTERN)]


class SecretKeyRef(_Model):
    """A key inside a Kubernetes Secret in the PgRecovery's namespace (or a local file)."""

    name: K8sName
    key: SecretKey


class SecretRef(_Model):
    """A whole Secret whose well-known keys are read (documented per use)."""

    name: K8sName


class SourceType(StrEnum):
    A9S_LOGICAL = "a9sLogical"
    WAL_E = "walE"


class TargetType(StrEnum):
    A9S_PG = "a9sPg"
    DINGO = "dingo"


# `openssl enc -md` of the backups (`backups.config.Digest` is the one enum; the engine may not
# import backups, so the spec names the values).
DigestName = Literal["auto", "md5", "sha256"]


class S3Source(_Model):
    bucket: Annotated[str, Field(pattern=BUCKET_PATTERN)]
    region: Annotated[str, Field(pattern=REGION_PATTERN)] = "us-east-1"
    endpoint: Annotated[str, Field(pattern=URL_PATTERN)] | None = None
    prefix: Annotated[str, Field(pattern=PREFIX_PATTERN)] = ""
    # Keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, optional AWS_SESSION_TOKEN.
    # Absent: the SDK's own chain (IRSA, instance profile, environment).
    credentials_secret_ref: SecretRef | None = None


class AzureSource(_Model):
    container: Annotated[str, Field(pattern=CONTAINER_PATTERN)]
    account_url: Annotated[str, Field(pattern=URL_PATTERN)] | None = None
    # Keys AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_KEY (+ AZURE_STORAGE_ACCOUNT; the older
    # AZURE_STORAGE_ACCOUNT_KEY is read too) / AZURE_STORAGE_SAS_TOKEN with accountUrl
    # (`backups.credentials`, shared with the CLI).
    credentials_secret_ref: SecretRef


class Encryption(_Model):
    key_secret_ref: SecretKeyRef
    digest: DigestName = "auto"


class Source(_Model):
    type: SourceType
    backup_guid: Annotated[str, Field(pattern=GUID_PATTERN)]
    backup_id: Annotated[str, Field(pattern=BACKUP_ID_PATTERN)] | None = None
    s3: S3Source | None = None
    azure: AzureSource | None = None
    encryption: Encryption | None = None

    @field_validator("backup_id", mode="before")
    @classmethod
    def _empty_is_latest(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _consistent(self) -> Source:
        if (self.s3 is None) == (self.azure is None):
            raise ValueError("exactly one of s3 and azure must be set")
        if self.backup_id is not None and not self.backup_id.startswith(self.backup_guid + "-"):
            raise ValueError(
                f"backupId {self.backup_id} does not belong to backupGuid {self.backup_guid}"
            )
        if self.type is SourceType.A9S_LOGICAL and self.encryption is None:
            raise ValueError(
                "a9sLogical backups are encrypted: encryption.keySecretRef is required"
            )
        if self.type is SourceType.WAL_E and self.azure is not None:
            raise ValueError("walE archives are read from s3 only")
        return self


class NodeSpec(_Model):
    name: Annotated[str, Field(pattern=NODE_NAME_PATTERN)]
    address: Annotated[str, Field(pattern=ADDRESS_PATTERN, max_length=253)]


class SshSpec(_Model):
    user: Annotated[str, Field(pattern=SSH_USER_PATTERN)]
    port: Annotated[int, Field(ge=1, le=65535)] = 22
    private_key_secret_ref: SecretKeyRef
    known_hosts_secret_ref: SecretKeyRef


class BoshGateway(_Model):
    """A jumpbox between pgrecovery and the VM network (like `bosh ssh --gw-host ...`)."""

    host: Annotated[str, Field(pattern=ADDRESS_PATTERN, max_length=253)]
    user: Annotated[str, Field(pattern=SSH_USER_PATTERN)]
    port: Annotated[int, Field(ge=1, le=65535)] = 22
    private_key_secret_ref: SecretKeyRef
    known_hosts_secret_ref: SecretKeyRef


class BoshTarget(_Model):
    """The VMs found and opened through the BOSH director (instead of nodes + ssh)."""

    director: Annotated[str, Field(pattern=DIRECTOR_PATTERN, max_length=300)]
    ca_cert_secret_ref: SecretKeyRef
    # keys `client` and `clientSecret` (a UAA client, or the director's basic-auth user)
    credentials_secret_ref: SecretRef
    # Absent: target.deployment (when given it must be the same).
    deployment: Annotated[str, Field(pattern=DEPLOYMENT_PATTERN)] | None = None
    instance_group: Annotated[str, Field(pattern=INSTANCE_GROUP_PATTERN)] = "pg"
    gateway: BoshGateway | None = None


class DingoEtcd(_Model):
    # Absent: the container's own ETCD_HOST_PORT (from `docker inspect`, as the runbook does).
    endpoint: Annotated[str, Field(pattern=ETCD_ENDPOINT_PATTERN)] | None = None


class DingoTarget(_Model):
    """The new service instance the deleted one is restored into (target.type dingo)."""

    instance_id: Annotated[str, Field(pattern=GUID_PATTERN)]
    # Absent: the container whose PATRONI_SCOPE is instance_id, searched on every node (cell).
    container: Annotated[str, Field(pattern=CONTAINER_NAME_PATTERN)] | None = None
    etcd: DingoEtcd = DingoEtcd()


class Target(_Model):
    type: TargetType
    deployment: Annotated[str, Field(pattern=DEPLOYMENT_PATTERN)]
    nodes: Annotated[list[NodeSpec], Field(min_length=1, max_length=16)] | None = None
    ssh: SshSpec | None = None
    bosh: BoshTarget | None = None
    postgres_major_version: Annotated[int, Field(ge=10, le=17)] = 15
    new_site: bool = False
    dingo: DingoTarget | None = None

    @model_validator(mode="after")
    def _dingo_fields(self) -> Target:
        if (self.type is TargetType.DINGO) != (self.dingo is not None):
            raise ValueError("target.dingo is required with type dingo and only valid with it")
        return self

    @model_validator(mode="after")
    def _nodes_or_bosh(self) -> Target:
        direct = self.nodes is not None or self.ssh is not None
        if direct == (self.bosh is not None) or (direct and not (self.nodes and self.ssh)):
            raise ValueError(
                "give exactly one of target.nodes + target.ssh, or target.bosh (the director "
                "finds and opens the VMs)"
            )
        if self.bosh and self.bosh.deployment not in (None, self.deployment):
            raise ValueError("target.bosh.deployment must equal target.deployment (or be absent)")
        return self

    def require_nodes(self) -> tuple[list[NodeSpec], SshSpec]:
        """nodes + ssh, for a recovery that does not go through the director."""
        if self.nodes is None or self.ssh is None:
            raise InvalidSpec(
                "target.nodes and target.ssh are not given: the VMs are reached through the "
                "director (target.bosh)",
                field="spec.target.bosh",
            )
        return self.nodes, self.ssh

    @model_validator(mode="after")
    def _unique_nodes(self) -> Target:
        names = [node.name for node in self.nodes or ()]
        if len(set(names)) != len(names):
            raise ValueError("node names must be unique")
        addresses = [node.address for node in self.nodes or ()]
        if len(set(addresses)) != len(addresses):
            raise ValueError("node addresses must be unique")
        return self


class PointInTime(_Model):
    target_time: datetime
    best_effort: bool = False

    @field_validator("target_time")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("targetTime needs a timezone (RFC 3339, e.g. 2026-11-21T10:00:00Z)")
        return value


class Parallelism(_Model):
    # 0 = decided from the primary's CPU count when the restore starts (cluster/parallel_restore).
    restore_connections: Annotated[int, Field(ge=0, le=32)] = 0
    standby_reclones: Annotated[int, Field(ge=1, le=16)] = 2


class RestoreOptions(_Model):
    # Databases the target already holds with objects, that the dump fills without dropping
    # them first (pg_dumpall without --clean): refused in Decrypting unless this is set, then
    # dropped right before the restore (cluster/existing_databases).
    replace_existing_databases: bool = False
    # While the standbys are stopped: the primary at wal_level minimal (restart) and each
    # table loaded by TRUNCATE + COPY FREEZE in one transaction (cluster/wal_free,
    # cluster/restore_script). false = the load as before.
    wal_free_load: bool = True


class RecoverySpec(_Model):
    source: Source
    target: Target
    point_in_time: PointInTime | None = None
    confirm: Annotated[str, Field(max_length=63)] = ""
    dry_run: bool = False
    parallelism: Parallelism = Parallelism()
    restore: RestoreOptions = RestoreOptions()

    @model_validator(mode="after")
    def _pitr_only_with_wale(self) -> RecoverySpec:
        if self.point_in_time is not None and self.source.type is not SourceType.WAL_E:
            raise ValueError("pointInTime is only valid with source.type walE")
        return self

    @model_validator(mode="after")
    def _replace_only_logical(self) -> RecoverySpec:
        logical = self.source.type is SourceType.A9S_LOGICAL
        if self.restore.replace_existing_databases and not logical:
            raise ValueError("restore.replaceExistingDatabases applies to a logical dump "
                             "(source.type a9sLogical) only")
        return self

    @model_validator(mode="after")
    def _dingo_from_wale(self) -> RecoverySpec:
        dingo = self.target.dingo
        if dingo is None:
            return self
        if self.source.type is not SourceType.WAL_E:
            raise ValueError("target.type dingo restores a WAL-E archive: source.type walE")
        if self.point_in_time is not None:
            raise ValueError("target.type dingo restores the whole archive; no pointInTime")
        if dingo.instance_id == self.source.backup_guid:
            raise ValueError(
                "target.dingo.instanceId must be the new instance, not the deleted one "
                "(source.backupGuid)"
            )
        return self

    @property
    def confirmed(self) -> bool:
        """Destructive phases may run: the user typed the deployment name into `confirm`."""
        return self.confirm == self.target.deployment


def parse_spec(raw: Any) -> RecoverySpec:
    """Parse a raw spec mapping; raise InvalidSpec naming the first offending field path."""
    try:
        return RecoverySpec.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        path = ".".join(["spec", *(str(part) for part in first["loc"])])
        # pydantic's message may echo the input; inputs are spec values, never secrets
        # (secrets are only referenced by name), so echoing is safe and helps the user.
        raise InvalidSpec(first["msg"], field=path) from None
