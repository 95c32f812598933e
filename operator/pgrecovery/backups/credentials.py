"""Object-store credentials from named values: a Kubernetes Secret's keys or the environment.

Why this module exists: the operator reads them from the Secret that `credentialsSecretRef`
names, local mode from `--secrets-dir` files or `PGRECOVERY_SECRET_*` variables (the same key
names), and `pgrecovery backups` from the environment. Parsed in two places they drifted apart:
the Secret wanted `AZURE_STORAGE_ACCOUNT_KEY` where the CLI and the az CLI say
`AZURE_STORAGE_KEY`. One parser now, one set of names:

- S3: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, optional `AWS_SESSION_TOKEN` (the AWS CLI's).
- Azure (the az CLI's): `AZURE_STORAGE_CONNECTION_STRING`; or `AZURE_STORAGE_KEY` with
  `AZURE_STORAGE_ACCOUNT`; or `AZURE_STORAGE_SAS_TOKEN`. `AZURE_STORAGE_ACCOUNT_KEY`, the name
  pgrecovery's Secrets used first, is still read where `AZURE_STORAGE_KEY` is absent, so
  existing Secrets keep working.

Values may be bytes (Secret data) or text (environment); surrounding whitespace (a newline from
`echo` into a file) is dropped. Error messages name the keys, never a value.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import SecretStr

from pgrecovery.backups.config import AzureCredentials, S3Credentials
from pgrecovery.errors import SecretError

AZURE_KEY_NAMES = ("AZURE_STORAGE_KEY", "AZURE_STORAGE_ACCOUNT_KEY")


def _text(values: Mapping[str, str | bytes], name: str) -> str | None:
    raw = values.get(name)
    if raw is None:
        return None
    text = (raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw).strip()
    return text or None


def s3_credentials(values: Mapping[str, str | bytes], where: str) -> S3Credentials:
    """`where` names the source in errors: "Secret ns/name", "the environment"."""
    access, secret = _text(values, "AWS_ACCESS_KEY_ID"), _text(values, "AWS_SECRET_ACCESS_KEY")
    missing = [n for n, v in (("AWS_ACCESS_KEY_ID", access), ("AWS_SECRET_ACCESS_KEY", secret))
               if v is None]
    if access is None or secret is None:
        raise SecretError(f"{where} needs keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                          f"(missing {', '.join(missing)})")
    token = _text(values, "AWS_SESSION_TOKEN")
    return S3Credentials(access_key_id=access, secret_access_key=SecretStr(secret),
                         session_token=SecretStr(token) if token else None)


def azure_credentials(values: Mapping[str, str | bytes], where: str) -> AzureCredentials:
    """A connection string wins; else an account key (with the account name, which a
    connection string or the account URL may also give); else a SAS token."""
    connection = _text(values, "AZURE_STORAGE_CONNECTION_STRING")
    if connection is not None:
        return AzureCredentials(connection_string=SecretStr(connection))
    key = next((k for k in (_text(values, n) for n in AZURE_KEY_NAMES) if k is not None), None)
    if key is not None:
        return AzureCredentials(account_name=_text(values, "AZURE_STORAGE_ACCOUNT"),
                                account_key=SecretStr(key))
    sas = _text(values, "AZURE_STORAGE_SAS_TOKEN")
    if sas is not None:
        return AzureCredentials(sas_token=SecretStr(sas))
    raise SecretError(
        f"{where} needs AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_KEY (with "
        "AZURE_STORAGE_ACCOUNT; the older name AZURE_STORAGE_ACCOUNT_KEY is read too) and the "
        "account URL, or AZURE_STORAGE_SAS_TOKEN and the account URL")
