"""Typed configuration of where backups live, how to reach them, and how they are encrypted.

Why this module exists: the engine parses the PgRecovery spec (and the CLI parses its flags)
into these small frozen objects, and the backups layer takes nothing else. Secret values are
pydantic `SecretStr`/`SecretBytes`, whose `repr` and `str` are masked, and the dataclass fields
holding them are excluded from `repr` as well, so a logged config never shows a secret.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pydantic import SecretBytes, SecretStr

from pgrecovery.errors import InvalidSpec, SecretError


class Digest(enum.StrEnum):
    """Message digest of OpenSSL's EVP_BytesToKey for `openssl enc -md …`."""

    AUTO = "auto"
    """Try MD5 (what the a9s Backup Manager passes), then SHA-256 (OpenSSL ≥ 1.1 default)."""
    MD5 = "md5"
    SHA256 = "sha256"


@dataclass(frozen=True)
class S3Location:
    """A bucket holding a9s-pg backups as `<prefix><guid>-<ms>-<n>` and `<guid>-<ms>.json`."""

    bucket: str
    region: str | None = None
    endpoint: str | None = None
    """Endpoint URL for S3-compatible stores; None means AWS."""
    prefix: str = ""
    """Key prefix in front of the backup names ([U] whether a9s ever uses one)."""

    def __post_init__(self) -> None:
        if not self.bucket:
            raise InvalidSpec("must not be empty", field="spec.source.s3.bucket")

    @property
    def description(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


@dataclass(frozen=True)
class S3Credentials:
    """Static S3 credentials; when absent, the SDK's usual chain (env, profile, role) applies."""

    access_key_id: str
    secret_access_key: SecretStr = field(repr=False)
    session_token: SecretStr | None = field(default=None, repr=False)


@dataclass(frozen=True)
class AzureLocation:
    """A container holding a9s-pg backups as single blobs `<prefix><guid>-<ms>`."""

    container: str
    account_url: str | None = None
    """`https://<account>.blob.core.windows.net`; None when a connection string names it."""
    prefix: str = ""

    def __post_init__(self) -> None:
        if not self.container:
            raise InvalidSpec("must not be empty", field="spec.source.azure.container")

    @property
    def description(self) -> str:
        where = self.account_url.rstrip("/") if self.account_url else "azure:"
        return f"{where}/{self.container}/{self.prefix}"


@dataclass(frozen=True)
class AzureCredentials:
    """One of: a connection string, an account key (with the account name), or a SAS token."""

    connection_string: SecretStr | None = field(default=None, repr=False)
    account_name: str | None = None
    account_key: SecretStr | None = field(default=None, repr=False)
    sas_token: SecretStr | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.connection_string, self.account_key, self.sas_token)]
        if sum(given) != 1:
            raise SecretError(
                "Azure credentials need exactly one of: a connection string, an account key, "
                "or a SAS token"
            )


@dataclass(frozen=True)
class EncryptionKey:
    """The backup encryption key (the `-pass` of `openssl enc`), as bytes.

    Never logged: `repr` shows only its length. Build it with `from_file_content` when it
    comes from a file or a Kubernetes Secret, so a trailing newline is treated the way
    `openssl enc -pass file:` treats it.
    """

    secret: SecretBytes = field(repr=False)

    def __post_init__(self) -> None:
        if not self.secret.get_secret_value():
            raise SecretError("the backup encryption key is empty")

    def __repr__(self) -> str:
        return "EncryptionKey(***)"

    def reveal(self) -> bytes:
        return self.secret.get_secret_value()

    @classmethod
    def from_bytes(cls, value: bytes) -> EncryptionKey:
        return cls(SecretBytes(value))

    @classmethod
    def from_file_content(cls, content: bytes) -> EncryptionKey:
        """Key as `openssl enc -pass file:PATH` reads it: the first line, without its `\\n`.

        Secrets written with `echo` or by editors end with a newline that is not part of the
        key; OpenSSL stops at the first `\\n` (it keeps a `\\r`), and so do we.
        """
        first, _, _ = content.partition(b"\n")
        return cls(SecretBytes(first))
