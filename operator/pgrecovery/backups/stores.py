"""Open an `ObjectStore` for a configured location: one registry entry per backend.

Why this module exists: callers above (plans, CLI) hold an `S3Location`/`AzureLocation` and the
raw values of a Secret or the environment; the adapters take plain values. This is the one
translation — credentials parsed the backend's way (`backups.credentials`), the adapter opened
— and it imports each SDK adapter only when that store is used, so reading a downloaded
directory never pays boto3's or azure's import time and memory.

Adding a backend: its adapter, a location type in `backups.config`, a credentials parser, one
`BACKENDS` entry, and the spec/CRD fields that describe it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pgrecovery.adapters.objectstore import ObjectStore
from pgrecovery.backups.config import AzureCredentials, AzureLocation, S3Credentials, S3Location
from pgrecovery.backups.credentials import azure_credentials, s3_credentials
from pgrecovery.errors import ConfigurationError

StoreLocation = S3Location | AzureLocation


async def open_s3_store(
    location: S3Location, credentials: S3Credentials | None = None, *, max_connections: int = 16
) -> ObjectStore:
    """S3 store for `location`; without `credentials`, boto3's default chain applies."""
    from pgrecovery.adapters.s3 import S3ObjectStore  # noqa: PLC0415 - import only when used

    return await S3ObjectStore.create(
        location.bucket,
        region=location.region,
        endpoint_url=location.endpoint,
        access_key_id=credentials.access_key_id if credentials else None,
        secret_access_key=(
            credentials.secret_access_key.get_secret_value() if credentials else None
        ),
        session_token=(
            credentials.session_token.get_secret_value()
            if credentials and credentials.session_token
            else None
        ),
        max_connections=max_connections,
    )


async def open_azure_store(location: AzureLocation, credentials: AzureCredentials) -> ObjectStore:
    """Azure Blob store for `location` with a connection string, account key or SAS."""
    from pgrecovery.adapters.azure import AzureBlobStore  # noqa: PLC0415 - import only when used

    if credentials.connection_string is not None:
        return AzureBlobStore.from_connection_string(
            credentials.connection_string.get_secret_value(), location.container
        )
    if location.account_url is None:
        raise ConfigurationError(
            "spec.source.azure.accountUrl is required unless the credentials are a "
            "connection string"
        )
    return AzureBlobStore.from_account_url(
        location.account_url,
        location.container,
        account_name=credentials.account_name,
        account_key=(
            credentials.account_key.get_secret_value() if credentials.account_key else None
        ),
        sas_token=credentials.sas_token.get_secret_value() if credentials.sas_token else None,
    )


@dataclass(frozen=True)
class Backend:
    """How to read one backend's credentials and open its store."""

    credentials: Callable[[Mapping[str, str | bytes], str], Any]
    open: Callable[[Any, Any], Awaitable[ObjectStore]]
    credentials_optional: bool = False
    """S3: without credentials boto3's default chain applies (instance roles, ~/.aws)."""


BACKENDS: dict[type, Backend] = {
    S3Location: Backend(s3_credentials, open_s3_store, credentials_optional=True),
    AzureLocation: Backend(azure_credentials, open_azure_store),
}


async def open_store(location: StoreLocation, values: Mapping[str, str | bytes] | None,
                     where: str) -> ObjectStore:
    """The store at `location`, with credentials from `values` (a Secret's data, a secrets
    directory, the environment); `where` names them in errors, never their content."""
    backend = BACKENDS[type(location)]
    if values is None:
        if not backend.credentials_optional:
            raise ConfigurationError(f"{type(location).__name__}: no credentials given")
        return await backend.open(location, None)
    return await backend.open(location, backend.credentials(values, where))
