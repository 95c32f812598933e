"""Open an `ObjectStore` for a configured location.

Why this module exists: callers above (engine, CLI) hold `S3Location`/`AzureLocation` and
credential objects; the adapters take plain values. This is the one translation, and it
imports each SDK adapter only when that store is used, so reading a downloaded directory
never pays boto3's or azure's import time and memory.
"""

from __future__ import annotations

from pgrecovery.adapters.objectstore import ObjectStore
from pgrecovery.backups.config import AzureCredentials, AzureLocation, S3Credentials, S3Location
from pgrecovery.errors import ConfigurationError


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
