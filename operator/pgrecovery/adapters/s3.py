"""S3 (and S3-compatible stores) behind `ObjectStore`: the only module that imports boto3.

Why this module exists: the backups layer lists and reads a9s-pg backup objects without
knowing botocore; this adapter makes the calls on worker threads (`asyncio.to_thread`, boto3
clients are thread-safe) and converts every botocore exception at the boundary:

- 5xx, `SlowDown`/throttling, timeouts, connection resets, truncated bodies → `StoreUnavailable`
- `AccessDenied`, unknown key id, bad signature, expired token, no credentials → `StoreAccessDenied`
- `NoSuchBucket`, `NoSuchKey`, 404 → `BackupNotFound`

botocore's own retries are off (`total_max_attempts=1`): `adapters/retry.py` is the single retry
policy, so waits are logged and bounded in one place.
"""

from __future__ import annotations

import asyncio
import functools
import http.client
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import boto3
import botocore.exceptions
import botocore.loaders
import botocore.session
from botocore.config import Config

from pgrecovery.adapters.objectstore import ObjectInfo
from pgrecovery.errors import BackupNotFound, RecoveryError, StoreAccessDenied, StoreUnavailable

T = TypeVar("T")

# One CopyObject request copies at most 5 GiB (AWS limit); DeleteObjects takes 1000 keys.
COPY_OBJECT_MAX_BYTES = 5 * 1024**3
DELETE_OBJECTS_MAX_KEYS = 1000

# One loader (the parsed service-model JSON) for every client of the process. A botocore
# session per store is needed for per-store credentials, but each one loading its own models
# cost about 12 MiB: 21 concurrent recoveries took the operator to 481 MiB peak RSS
# (tests/e2e/test_concurrent_recoveries.py); with the loader shared, 21 clients take ~25 MiB.
_LOADER = botocore.loaders.create_loader()

_DENIED = {
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AuthorizationHeaderMalformed",
    "AccountProblem",
    "InvalidSecurity",
}
_MISSING = {"NoSuchBucket", "NoSuchKey", "NotFound", "404"}
_BUSY = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "503",
    "500",
}


def convert_error(exc: Exception, what: str) -> RecoveryError:  # noqa: PLR0911 - a flat map
    """The pgrecovery error for a botocore exception raised while doing `what`."""
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        message = error.get("Message") or code or f"HTTP {status}"
        if code in _DENIED or status in (401, 403):
            return StoreAccessDenied(
                f"{what}: the store refused the credentials ({code or status}: {message}); "
                "check spec.source.*.credentialsSecretRef and the bucket policy"
            )
        if code in _MISSING or status == 404:
            return BackupNotFound(f"{what}: not found ({code or status}: {message})")
        if code in _BUSY or status >= 500 or status == 429:
            retry_after = (
                exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("retry-after")
            )
            delay = float(retry_after) if retry_after and retry_after.isdigit() else None
            return StoreUnavailable(
                f"{what}: store busy or failing ({code or status}: {message})", delay=delay
            )
        return StoreUnavailable(f"{what}: unexpected store error ({code or status}: {message})")
    if isinstance(
        exc, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError
    ):
        return StoreAccessDenied(
            f"{what}: no usable S3 credentials ({exc}); set AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY or spec.source.s3.credentialsSecretRef"
        )
    if isinstance(exc, botocore.exceptions.CredentialRetrievalError):
        return StoreAccessDenied(f"{what}: could not obtain S3 credentials ({exc})")
    # Connection refused/reset, timeouts, truncated bodies: all worth another try.
    return StoreUnavailable(f"{what}: {type(exc).__name__}: {exc}")


# Pieces of a body copied at a time when it cannot be received in place (small enough that
# the transient bytes objects stay far below glibc's mmap threshold games).
READ_PIECE = 256 << 10


def _receive_into(body: Any, buffer: memoryview) -> int:
    """Read a GetObject body into `buffer`; return the number of bytes received.

    botocore's `StreamingBody` wraps urllib3's response, which wraps `http.client`'s. Reading
    through the public `read(n)` costs three copies and as many allocations per piece; the
    `http.client` response's `readinto` receives from the socket straight into `buffer`.
    After a whole body urllib3's `release_conn()` (public) returns the connection to the pool;
    anything else closes it. If the layers are not what we expect (a botocore that wraps the
    body in a checksum reader, a content encoding), `read(n)` is used instead.
    """
    raw = getattr(body, "_raw_stream", None)
    fp = getattr(raw, "_fp", None)
    direct = (
        type(body).__name__ == "StreamingBody"
        and callable(getattr(fp, "readinto", None))
        and callable(getattr(raw, "release_conn", None))
        and not (getattr(raw, "headers", None) or {}).get("content-encoding")
    )
    got = 0
    clean = False
    try:
        while got < len(buffer):
            if direct:
                n = fp.readinto(buffer[got:])  # type: ignore[union-attr]
            else:
                piece = body.read(min(READ_PIECE, len(buffer) - got))
                n = len(piece)
                buffer[got : got + n] = piece
            if not n:
                break
            got += n
        if not direct and got == len(buffer) and body.read(1):
            # The empty read at the end also lets a checksumming body verify itself.
            got += 1
        clean = got == len(buffer)
    except (OSError, http.client.HTTPException) as exc:  # raised by http.client directly
        raise ConnectionError(f"{type(exc).__name__}: {exc}") from exc
    finally:
        if direct and clean:
            raw.release_conn()  # type: ignore[union-attr]
        else:
            body.close()
    return got


class S3ObjectStore:
    """One bucket, read-only. Build with `await S3ObjectStore.create(...)`."""

    def __init__(self, client: Any, bucket: str, *, endpoint: str | None = None) -> None:
        self._client = client
        self.bucket = bucket
        self._endpoint = endpoint

    @classmethod
    async def create(
        cls,
        bucket: str,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        max_connections: int = 16,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
    ) -> S3ObjectStore:
        """A store for `bucket`; without explicit keys boto3's usual chain applies
        (environment, shared config/credentials files, instance role)."""

        def build() -> Any:
            core = botocore.session.get_session()
            core.register_component("data_loader", _LOADER)
            session = boto3.session.Session(
                botocore_session=core,
                aws_access_key_id=access_key_id,
                aws_secret_access_key=secret_access_key,
                aws_session_token=session_token,
                region_name=region,
            )
            config = Config(
                # `total_max_attempts` counts the first request; botocore's `max_attempts`
                # counts *retries*, so `max_attempts: 1` (as written here before) still let
                # botocore retry once on its own, with its own backoff (seen through the fault
                # proxy in tests/integration/test_faults_objectstore.py).
                retries={"total_max_attempts": 1, "mode": "standard"},
                max_pool_connections=max_connections,
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                # Path-style works with every S3-compatible store; AWS still accepts it.
                s3={"addressing_style": "path"} if endpoint_url else None,
            )
            return session.client("s3", endpoint_url=endpoint_url, config=config)

        try:
            client = await asyncio.to_thread(build)
        except (botocore.exceptions.BotoCoreError, ValueError) as exc:
            raise StoreUnavailable(f"cannot set up an S3 client for {bucket}: {exc}") from exc
        return cls(client, bucket, endpoint=endpoint_url)

    @property
    def description(self) -> str:
        where = f" at {self._endpoint}" if self._endpoint else ""
        return f"s3://{self.bucket}{where}"

    async def _call(self, what: str, fn: Callable[[], T]) -> T:
        if self._endpoint:
            # A custom endpoint is the first thing to check when the store fails: name it.
            what = f"{what} (endpoint {self._endpoint})"
        try:
            return await asyncio.to_thread(fn)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise convert_error(exc, what) from exc
        except (ConnectionError, TimeoutError) as exc:  # raw socket errors from urllib3
            raise StoreUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc

    async def list(self, prefix: str, *, limit: int | None = None) -> list[ObjectInfo]:
        def run() -> list[ObjectInfo]:
            out: list[ObjectInfo] = []
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", ()):
                    out.append(
                        ObjectInfo(
                            key=item["Key"],
                            size=int(item["Size"]),
                            etag=str(item.get("ETag", "")).strip('"') or None,
                        )
                    )
                    if limit is not None and len(out) >= limit:
                        return out
            return out

        return await self._call(f"list s3://{self.bucket}/{prefix}*", run)

    async def head(self, key: str) -> ObjectInfo:
        def run() -> ObjectInfo:
            resp = self._client.head_object(Bucket=self.bucket, Key=key)
            return ObjectInfo(
                key=key,
                size=int(resp["ContentLength"]),
                etag=str(resp.get("ETag", "")).strip('"') or None,
            )

        return await self._call(f"head s3://{self.bucket}/{key}", run)

    async def read_range(self, key: str, start: int, end: int) -> bytes:
        what = f"read s3://{self.bucket}/{key} bytes {start}-{end - 1}"

        def run() -> bytes:
            resp = self._client.get_object(
                Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end - 1}"
            )
            body = resp["Body"]
            try:
                data: bytes = body.read()
            finally:
                body.close()
            return data

        if end <= start:
            return b""
        data = await self._call(what, run)
        if len(data) != end - start:
            # A short body is a cut connection (or the object changed): retry the range.
            raise StoreUnavailable(f"{what}: got {len(data)} bytes, expected {end - start}")
        return data

    async def read_range_into(self, key: str, start: int, buffer: memoryview) -> None:
        """Bytes `[start, start + len(buffer))` of `key` written into `buffer`, exactly.

        The body is received straight into `buffer` (no bytes object per range, no copy), so a
        streaming decrypt holds only its fixed buffers; see `_receive_into`.
        """
        end = start + len(buffer)
        if end <= start:
            return
        what = f"read s3://{self.bucket}/{key} bytes {start}-{end - 1}"

        def run() -> int:
            resp = self._client.get_object(
                Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end - 1}"
            )
            return _receive_into(resp["Body"], buffer)

        got = await self._call(what, run)
        if got != len(buffer):
            raise StoreUnavailable(f"{what}: got {got} bytes, expected {len(buffer)}")

    async def close(self) -> None:
        await asyncio.to_thread(self._client.close)

    # ---------------------------------------------------------------- writes (Dingo clone)
    # Server-side only: the bytes never pass through the operator. Used to clone a WAL-E
    # archive from a deleted instance's prefix into the new instance's prefix.

    async def copy(self, source_key: str, dest_key: str, *, size: int | None = None) -> ObjectInfo:
        """Copy an object inside the bucket (CopyObject; objects above 5 GiB, which one
        request cannot copy, through boto3's multipart UploadPartCopy); returns the copy's
        size and ETag as a HEAD sees them."""

        def run() -> None:
            source = {"Bucket": self.bucket, "Key": source_key}
            if size is not None and size <= COPY_OBJECT_MAX_BYTES:
                self._client.copy_object(Bucket=self.bucket, Key=dest_key, CopySource=source)
            else:
                self._client.copy(source, self.bucket, dest_key)

        await self._call(f"copy s3://{self.bucket}/{source_key} to {dest_key}", run)
        return await self.head(dest_key)

    async def delete(self, keys: Sequence[str]) -> int:
        """Delete `keys` (DeleteObjects, at most 1000 per request); returns how many were
        deleted. A key that does not exist counts as deleted (S3 semantics); any per-key
        error fails the whole call."""

        def run(batch: Sequence[str]) -> list[str]:
            resp = self._client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
            )
            return [f"{e.get('Key')}: {e.get('Code')}" for e in resp.get("Errors", ())]

        done = 0
        for start in range(0, len(keys), DELETE_OBJECTS_MAX_KEYS):
            batch = keys[start : start + DELETE_OBJECTS_MAX_KEYS]
            what = f"delete {len(batch)} object(s) under s3://{self.bucket}/"
            errors = await self._call(what, functools.partial(run, batch))
            if errors:
                # Per-key errors come back in a 200 response: the same codes as a request's.
                code = errors[0].rsplit(": ", 1)[-1]
                raise convert_error(
                    botocore.exceptions.ClientError(
                        {"Error": {"Code": code, "Message": errors[0]}}, "DeleteObjects"
                    ),
                    f"{what} ({len(errors)} failed)",
                )
            done += len(batch)
        return done
