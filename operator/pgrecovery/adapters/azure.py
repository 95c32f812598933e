"""Azure Blob Storage behind `ObjectStore`: the only module that imports azure-storage-blob.

Why this module exists: a9s-pg backups on Azure are single blobs `<guid>-<ms>`; the backups
layer reads them through `ObjectStore` like S3 parts. The synchronous SDK runs on worker
threads (`asyncio.to_thread`; clients are thread-safe) and its exceptions are converted here:

- 5xx, `ServerBusy`, timeouts, connection errors, short reads → `StoreUnavailable`
- 401/403, `AuthenticationFailed`, `AuthorizationFailure` → `StoreAccessDenied`
- `ContainerNotFound`, `BlobNotFound`, 404 → `BackupNotFound`

The SDK's own retries are off (`retry_total=0`): `adapters/retry.py` decides. (One exception
the SDK keeps: a body cut mid-download is re-requested inside `readall()` a few times; bounded,
and the bytes are still checked by length here and by gzip's CRC later.) Timeouts match the S3
adapter: 10 s to connect, 60 s without a byte before a read counts as failed, so a store that
accepts and never answers costs one minute per attempt, not azure-core's default.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import IO, Any, TypeVar, cast
from urllib.parse import urlparse

from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
)
from azure.storage.blob import ContainerClient

from pgrecovery.adapters.objectstore import ObjectInfo
from pgrecovery.errors import BackupNotFound, RecoveryError, StoreAccessDenied, StoreUnavailable

T = TypeVar("T")

CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0

_DENIED_CODES = {
    "AuthenticationFailed",
    "AuthorizationFailure",
    "AuthorizationPermissionMismatch",
    "InsufficientAccountPermissions",
    "AccountIsDisabled",
}


def convert_error(exc: Exception, what: str) -> RecoveryError:
    """The pgrecovery error for an azure-core exception raised while doing `what`."""
    if isinstance(exc, HttpResponseError):
        status = exc.status_code or 0
        # The public SDK methods fill `error_code`; the generated operation that streams a
        # range (read_range_into) leaves it to the `x-ms-error-code` header.
        headers = getattr(exc.response, "headers", None) or {}
        raw = getattr(exc, "error_code", None) or headers.get("x-ms-error-code") or exc.reason
        raw = raw or status
        code = str(getattr(raw, "value", raw))  # azure gives a StorageErrorCode enum
        if (
            isinstance(exc, ClientAuthenticationError)
            or status in (401, 403)
            or code in _DENIED_CODES
        ):
            return StoreAccessDenied(
                f"{what}: Azure refused the credentials ({code}); check "
                "spec.source.azure.credentialsSecretRef (account key, SAS or connection string)"
            )
        if isinstance(exc, ResourceNotFoundError) or status == 404:
            return BackupNotFound(f"{what}: not found ({code})")
        return StoreUnavailable(f"{what}: Azure error ({code}, HTTP {status or '?'})")
    # ServiceRequestError / ServiceResponseError / other AzureError: network trouble.
    return StoreUnavailable(f"{what}: {type(exc).__name__}: {exc}")


class AzureBlobStore:
    """One container, read-only. Build with `from_connection_string` or `from_account_url`."""

    def __init__(self, container: ContainerClient, *, account: str) -> None:
        self._container = container
        self._account = account

    @classmethod
    def from_connection_string(
        cls,
        connection_string: str,
        container: str,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
    ) -> AzureBlobStore:
        try:
            client = ContainerClient.from_connection_string(
                connection_string,
                container_name=container,
                retry_total=0,
                connection_timeout=connect_timeout,
                read_timeout=read_timeout,
            )
        except (ValueError, AzureError) as exc:
            # The message of a bad connection string may quote it: do not pass it on.
            raise StoreAccessDenied(
                f"the Azure connection string is malformed ({type(exc).__name__})"
            ) from exc
        return cls(client, account=client.account_name or "?")

    @classmethod
    def from_account_url(
        cls,
        account_url: str,
        container: str,
        *,
        account_name: str | None = None,
        account_key: str | None = None,
        sas_token: str | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
    ) -> AzureBlobStore:
        credential: Any
        if account_key is not None:
            name = account_name or _account_from_url(account_url)
            credential = {"account_name": name, "account_key": account_key}
        else:
            credential = sas_token
        try:
            client = ContainerClient(
                account_url,
                container_name=container,
                credential=credential,
                retry_total=0,
                connection_timeout=connect_timeout,
                read_timeout=read_timeout,
            )
        except (ValueError, AzureError) as exc:
            raise StoreAccessDenied(
                f"cannot use the Azure account URL {account_url!r} ({type(exc).__name__})"
            ) from exc
        return cls(client, account=client.account_name or account_url)

    @property
    def description(self) -> str:
        return f"azure://{self._account}/{self._container.container_name}"

    async def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(fn)
        except AzureError as exc:
            raise convert_error(exc, what) from exc
        except (ConnectionError, TimeoutError) as exc:
            raise StoreUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc

    async def list(self, prefix: str, *, limit: int | None = None) -> list[ObjectInfo]:
        def run() -> list[ObjectInfo]:
            out: list[ObjectInfo] = []
            for blob in self._container.list_blobs(name_starts_with=prefix or None):
                out.append(
                    ObjectInfo(
                        key=blob.name,
                        size=int(blob.size),
                        etag=str(blob.etag or "").strip('"') or None,
                    )
                )
                if limit is not None and len(out) >= limit:
                    break
            return out

        return await self._call(f"list {self.description}/{prefix}*", run)

    async def head(self, key: str) -> ObjectInfo:
        def run() -> ObjectInfo:
            props = self._container.get_blob_client(key).get_blob_properties()
            return ObjectInfo(
                key=key, size=int(props.size), etag=str(props.etag or "").strip('"') or None
            )

        return await self._call(f"head {self.description}/{key}", run)

    async def read_range(self, key: str, start: int, end: int) -> bytes:
        what = f"read {self.description}/{key} bytes {start}-{end - 1}"
        if end <= start:
            return b""

        def run() -> bytes:
            downloader = self._container.get_blob_client(key).download_blob(
                offset=start, length=end - start, max_concurrency=1
            )
            return downloader.readall()

        data = await self._call(what, run)
        if len(data) != end - start:
            raise StoreUnavailable(f"{what}: got {len(data)} bytes, expected {end - start}")
        return data

    async def read_range_into(self, key: str, start: int, buffer: memoryview) -> None:
        """Bytes `[start, start + len(buffer))` of `key` written into `buffer`, exactly."""
        end = start + len(buffer)
        if end <= start:
            return
        what = f"read {self.description}/{key} bytes {start}-{end - 1}"

        def run() -> int:
            blob = self._container.get_blob_client(key)
            # The generated operation streams the body in 256 KiB blocks; `download_blob`
            # would first join the whole response in memory (`process_content`), a second
            # copy of every range in flight.
            generated = getattr(getattr(blob, "_client", None), "blob", None)
            download = getattr(generated, "download", None)
            if not callable(download):  # an SDK laid out differently: the public way
                sink = _BufferSink(buffer)
                blob.download_blob(offset=start, length=end - start, max_concurrency=1).readinto(
                    cast(IO[bytes], sink)  # it only calls write()
                )
                return sink.filled
            sink = _BufferSink(buffer)
            for block in download(range=f"bytes={start}-{end - 1}"):
                sink.write(block)
            return sink.filled

        got = await self._call(what, run)
        if got != len(buffer):
            raise StoreUnavailable(f"{what}: got {got} bytes, expected {len(buffer)}")

    async def close(self) -> None:
        await asyncio.to_thread(self._container.close)


class _BufferSink:
    """A write-only stream over a caller's buffer, for `StorageStreamDownloader.readinto`."""

    def __init__(self, buffer: memoryview) -> None:
        self._buffer = buffer
        self.filled = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, data: bytes | memoryview) -> int:
        n = len(data)
        if self.filled + n > len(self._buffer):
            raise StoreUnavailable(f"the store sent more than the {len(self._buffer)} bytes asked")
        self._buffer[self.filled : self.filled + n] = data
        self.filled += n
        return n


def _account_from_url(account_url: str) -> str:
    """`myaccount` from `https://myaccount.blob.core.windows.net` or Azurite's
    `http://127.0.0.1:10000/devstoreaccount1`."""
    parsed = urlparse(account_url)
    path = parsed.path.strip("/")
    if path:
        return path.split("/")[0]
    return (parsed.hostname or "").split(".")[0]
