"""Make an a9s-pg logical backup of the simulated primary, as the a9s backup agent does.

The runbook's restore reverses exactly this: `pg_dumpall` (as postgres, inside the primary)
→ `gzip` → `openssl enc -aes256 -md md5` → `split -b <part size>` into `<backup-id>-<index>`
objects plus a `<backup-id>.json` metadata object in S3; on Azure one blob `<backup-id>` with
the whole ciphertext. Backup id = `<guid>-<epoch milliseconds>`.

The encryption key never appears on a command line: openssl reads it from an inherited pipe
(`-pass fd:N`). Uploads go to any S3 endpoint (boto3) or any Azure connection string
(azure-storage-blob, e.g. Azurite); the object-store servers themselves are fixtures of
`tests/objectstores/`.

Part index start, part size and the metadata schema of real a9s backups are unknown
publicly (see formats.md): they are parameters here, with the runbook's reading as defaults.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import boto3
from azure.core.exceptions import ResourceExistsError
from azure.storage.blob import BlobServiceClient
from botocore.config import Config
from botocore.exceptions import ClientError

from .config import PG_BINDIR

if TYPE_CHECKING:
    from .cluster import SimVM

# "split into multiple files containing 1GB each" (runbook); whether 10^9 or 2^30 is unknown.
DEFAULT_PART_SIZE = 10**9
_COPY_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class BackupPart:
    key: str
    """Object key (S3) or blob name (Azure)."""
    size: int


@dataclass(frozen=True)
class A9sBackup:
    """What a PgRecovery spec (and a test's assertions) need about one uploaded backup."""

    storage: Literal["s3", "azure"]
    guid: str
    """The a9s backup GUID (`spec.source.backupGuid`)."""
    backup_id: str
    """`<guid>-<timestamp_ms>` (`spec.source.backupId`)."""
    timestamp_ms: int
    bucket: str
    """S3 bucket or Azure container."""
    endpoint: str
    """S3 endpoint URL or Azure account URL."""
    region: str | None
    prefix: str
    """Key prefix in front of every object name ('' in the runbook's layout)."""
    parts: tuple[BackupPart, ...]
    """In natural order. S3: `<prefix><backup-id>-<index>`; Azure: the one blob
    `<prefix><backup-id>`."""
    metadata_key: str | None
    """S3: `<prefix><backup-id>.json`; Azure: None."""
    ciphertext_size: int
    plain_size: int
    """Bytes of the pg_dumpall script."""
    plain_sha256: str
    """sha256 of the pg_dumpall script (to check a decrypted download)."""
    digest: str
    """openssl `-md` used for the key derivation (`md5` like a9s, or `sha256`)."""
    part_size: int | None
    encryption_key: str = field(repr=False)

    @property
    def part_keys(self) -> list[str]:
        return [p.key for p in self.parts]


@dataclass(frozen=True)
class LocalBackupFiles:
    """An encrypted dump on the host, before upload."""

    directory: Path
    files: tuple[Path, ...]
    """Parts `<backup-id>-<i>` in natural order, or the single file `<backup-id>`."""
    plain_size: int
    plain_sha256: str

    @property
    def ciphertext_size(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def new_guid() -> str:
    return str(uuid.uuid4())


def backup_id_for(guid: str, timestamp_ms: int | None = None) -> tuple[str, int]:
    """(`<guid>-<epoch ms>`, timestamp) — 13 digits for any date after 2001."""
    ts = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    if len(str(ts)) != 13:
        raise ValueError(f"timestamp {ts} is not 13-digit epoch milliseconds")
    return f"{guid}-{ts}", ts


def _check_key(encryption_key: str) -> bytes:
    # openssl reads one line from the fd: a newline would cut the key.
    if not encryption_key or "\n" in encryption_key or "\r" in encryption_key:
        raise ValueError("encryption key must be one non-empty line")
    return encryption_key.encode()


def write_backup_files(
    vm: SimVM,
    *,
    backup_id: str,
    encryption_key: str,
    directory: Path,
    part_size: int | None = DEFAULT_PART_SIZE,
    first_index: int = 0,
    digest: str = "md5",
    dumpall_args: Sequence[str] = (),
    edit_dump: Callable[[bytes], bytes] | None = None,
) -> LocalBackupFiles:
    """Dump `vm`'s whole PostgreSQL into encrypted files in `directory`.

    `edit_dump` (tests of what a restore does with an odd dump): the whole plain dump is read,
    changed by it, then compressed and encrypted as usual (so only for small dumps).

    `pg_dumpall` runs inside the VM as postgres:vcap; gzip, openssl and split run on the host
    and read its output through a pipe. `part_size=None` writes one file `<backup-id>`
    (the Azure layout); otherwise parts `<backup-id>-<first_index>`, `-<first_index+1>`, …
    """
    key = _check_key(encryption_key)
    if digest not in ("md5", "sha256"):
        raise ValueError("digest is md5 or sha256")
    directory.mkdir(parents=True, exist_ok=True)
    key_r, key_w = os.pipe()
    os.write(key_w, key)
    os.close(key_w)

    dump = vm.popen(["chpst", "-u", "postgres:vcap", f"{PG_BINDIR}/pg_dumpall", *dumpall_args])
    gzip = subprocess.Popen(["gzip", "-c"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    openssl = subprocess.Popen(
        ["openssl", "enc", "-aes256", "-md", digest, "-salt", "-pass", f"fd:{key_r}"],
        stdin=gzip.stdout,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=(key_r,),
    )
    os.close(key_r)
    assert gzip.stdout is not None
    assert openssl.stdout is not None
    gzip.stdout.close()  # openssl holds it now; gzip gets SIGPIPE if openssl dies
    tmp_prefix = directory / f".{backup_id}.split-"
    if part_size is None:
        out = open(directory / backup_id, "wb")  # noqa: SIM115 - closed after the pipeline
        sink = subprocess.Popen(["cat"], stdin=openssl.stdout, stdout=out)
    else:
        out = None
        sink = subprocess.Popen(
            ["split", "-b", str(part_size), "-d", "-a", "6", "-", str(tmp_prefix)],
            stdin=openssl.stdout,
        )
    openssl.stdout.close()

    # Hash the plain dump on its way to gzip, in a thread so no pipe can fill up and stall.
    sha = hashlib.sha256()
    plain = 0
    copy_error: list[BaseException] = []

    def copy() -> None:
        nonlocal plain
        assert dump.stdout is not None
        assert gzip.stdin is not None
        try:
            if edit_dump is not None:
                edited = edit_dump(dump.stdout.read())
                sha.update(edited)
                plain += len(edited)
                gzip.stdin.write(edited)
            while chunk := dump.stdout.read(_COPY_CHUNK):
                sha.update(chunk)
                plain += len(chunk)
                gzip.stdin.write(chunk)
        except BaseException as exc:  # reported after the processes are collected
            copy_error.append(exc)
        finally:
            with contextlib.suppress(BrokenPipeError):
                gzip.stdin.close()

    copier = threading.Thread(target=copy, name=f"dump-{vm.name}", daemon=True)
    copier.start()
    dump_err = dump.stderr.read() if dump.stderr else b""
    copier.join()
    codes = {
        "pg_dumpall": dump.wait(),
        "gzip": gzip.wait(),
        "openssl": openssl.wait(),
        "split": sink.wait(),
    }
    openssl_err = openssl.stderr.read() if openssl.stderr else b""
    if out is not None:
        out.close()
    if copy_error or any(codes.values()):
        raise RuntimeError(
            f"backup pipeline failed: exit codes {codes}; pg_dumpall: "
            f"{dump_err.decode(errors='replace')[-1000:]}; openssl: "
            f"{openssl_err.decode(errors='replace')[-500:]}; copy: {copy_error}"
        )

    files: tuple[Path, ...]
    if part_size is None:
        files = (directory / backup_id,)
    else:
        # split numbers with fixed width (-000003); a9s names parts naturally (-3).
        pieces = sorted(directory.glob(f"{tmp_prefix.name}*"))
        renamed = []
        for n, piece in enumerate(pieces):
            target = directory / f"{backup_id}-{first_index + n}"
            piece.rename(target)
            renamed.append(target)
        files = tuple(renamed)
    return LocalBackupFiles(
        directory=directory, files=files, plain_size=plain, plain_sha256=sha.hexdigest()
    )


def metadata_document(
    backup_id: str, guid: str, timestamp_ms: int, files: LocalBackupFiles, part_size: int
) -> dict[str, Any]:
    """Content of `<backup-id>.json`. The real schema is not public: a plausible one."""
    return {
        "backup_id": backup_id,
        "instance_guid": guid,
        "timestamp": timestamp_ms,
        "size": files.ciphertext_size,
        "parts": len(files.files),
        "part_size": part_size,
        "compression": "gzip",
        "encryption": "aes-256-cbc",
        "format": "pg_dumpall",
    }


def make_s3_backup(
    vm: SimVM,
    *,
    endpoint_url: str,
    bucket: str,
    access_key_id: str,
    secret_access_key: str,
    encryption_key: str,
    region: str = "us-east-1",
    guid: str | None = None,
    timestamp_ms: int | None = None,
    part_size: int = DEFAULT_PART_SIZE,
    first_index: int = 0,
    prefix: str = "",
    digest: str = "md5",
    create_bucket: bool = True,
    write_metadata: bool = True,
    dumpall_args: Sequence[str] = (),
    workdir: Path | None = None,
    edit_dump: Callable[[bytes], bytes] | None = None,
) -> A9sBackup:
    """Back up `vm` (the primary) into an S3 bucket in the a9s layout and describe it."""
    guid = guid or new_guid()
    backup_id, ts = backup_id_for(guid, timestamp_ms)
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        region_name=region,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
    )
    if create_bucket:
        try:
            s3.head_bucket(Bucket=bucket)
        except ClientError:
            kwargs: dict[str, Any] = {"Bucket": bucket}
            if region != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
            s3.create_bucket(**kwargs)

    with _workdir(workdir) as wd:
        files = write_backup_files(
            vm,
            backup_id=backup_id,
            encryption_key=encryption_key,
            directory=wd,
            part_size=part_size,
            first_index=first_index,
            digest=digest,
            dumpall_args=dumpall_args,
            edit_dump=edit_dump,
        )
        parts = []
        for f in files.files:
            key = prefix + f.name
            s3.upload_file(str(f), bucket, key)
            parts.append(BackupPart(key=key, size=f.stat().st_size))
        metadata_key = None
        if write_metadata:
            metadata_key = f"{prefix}{backup_id}.json"
            doc = metadata_document(backup_id, guid, ts, files, part_size)
            s3.put_object(
                Bucket=bucket,
                Key=metadata_key,
                Body=json.dumps(doc).encode(),
                ContentType="application/json",
            )
        return A9sBackup(
            storage="s3",
            guid=guid,
            backup_id=backup_id,
            timestamp_ms=ts,
            bucket=bucket,
            endpoint=endpoint_url,
            region=region,
            prefix=prefix,
            parts=tuple(parts),
            metadata_key=metadata_key,
            ciphertext_size=files.ciphertext_size,
            plain_size=files.plain_size,
            plain_sha256=files.plain_sha256,
            digest=digest,
            part_size=part_size,
            encryption_key=encryption_key,
        )


def make_azure_backup(
    vm: SimVM,
    *,
    connection_string: str,
    container: str,
    encryption_key: str,
    guid: str | None = None,
    timestamp_ms: int | None = None,
    prefix: str = "",
    digest: str = "md5",
    create_container: bool = True,
    dumpall_args: Sequence[str] = (),
    workdir: Path | None = None,
) -> A9sBackup:
    """Back up `vm` (the primary) into an Azure container: one blob `<backup-id>`."""
    guid = guid or new_guid()
    backup_id, ts = backup_id_for(guid, timestamp_ms)
    service = BlobServiceClient.from_connection_string(connection_string)
    container_client = service.get_container_client(container)
    if create_container:
        with contextlib.suppress(ResourceExistsError):
            container_client.create_container()
    with _workdir(workdir) as wd:
        files = write_backup_files(
            vm,
            backup_id=backup_id,
            encryption_key=encryption_key,
            directory=wd,
            part_size=None,
            digest=digest,
            dumpall_args=dumpall_args,
        )
        (single,) = files.files
        name = prefix + backup_id
        with open(single, "rb") as data:
            container_client.upload_blob(name, data, length=single.stat().st_size, overwrite=True)
        return A9sBackup(
            storage="azure",
            guid=guid,
            backup_id=backup_id,
            timestamp_ms=ts,
            bucket=container,
            endpoint=service.url,
            region=None,
            prefix=prefix,
            parts=(BackupPart(key=name, size=single.stat().st_size),),
            metadata_key=None,
            ciphertext_size=files.ciphertext_size,
            plain_size=files.plain_size,
            plain_sha256=files.plain_sha256,
            digest=digest,
            part_size=None,
            encryption_key=encryption_key,
        )


@contextlib.contextmanager
def _workdir(given: Path | None) -> Iterator[Path]:
    """`given` as is (kept), or a private temporary directory removed afterwards."""
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    d = Path(tempfile.mkdtemp(prefix="a9s-backup-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
