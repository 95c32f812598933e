"""Host-side API of the WAL-E test world: where an archive lives, how PostgreSQL archives into
it, real base backups in WAL-E's layout, WAL switches, and what the archive holds.

Why this exists: the physical-recovery code (WAL-E restore onto the a9s-pg cluster, the Dingo
recovery) must be tested against archives a real PostgreSQL 15 wrote. WAL-E cannot back up
PostgreSQL 15 (it uses the exclusive `pg_start_backup`, removed in 15), so the layout is
produced the way WAL-E would have laid it out, from real PostgreSQL output:

- WAL: PostgreSQL's own `archive_command` runs `walcmd.py push` (lzop + S3 PUT, see there).
- Base backups: `pg_basebackup -Ft -X none` (non-exclusive backup API; the `backup_label` is
  inside the tar, as PostgreSQL needs it), re-partitioned file by file like WAL-E's
  tar_partition.py, minus what WAL-E leaves out (pg_wal/pg_xlog/pg_replslot/pg_log contents,
  pgsql_tmp, pg_stat_tmp, postmaster.pid/.opts and the config files postgresql.conf,
  pg_hba.conf, pg_ident.conf, recovery.conf, recovery.done, promote — WAL-E keeps
  postgresql.auto.conf, so do we), each partition through `lzop --stdout`, plus
  `extended_version.txt` (`SELECT version()`), the stop sentinel JSON with WAL-E's keys and
  `sysids/sysid` as Dingo's patroni wrote it (`pg_controldata` value + newline).

A PostgreSQL is anything with the small `PostgresHost` protocol: a simulated VM
(`tests.wale.simarchive.VMPostgres`) or a scratch local server (`tests.wale.localpg`).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, Protocol

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from .layout import (
    GUID_RE,
    SEGMENT_RE,
    WAL_SEGMENT_SIZE,
    Layout,
    parse_lsn,
    segment_name,
    segment_number,
    walfile_containing,
    walfile_name_offset,
)

WALCMD = Path(__file__).with_name("walcmd.py")
PG_BINDIR = "/usr/lib/postgresql/15/bin"
SYSTEM_PYTHON = "/usr/bin/python3"
"""The interpreter archive_command uses: visible in the VMs (shared /usr), stdlib only."""

PARTITION_MAX_SZ = 1610612736
"""WAL-E's partition size (1.5 GiB); tests pass a small one to force several partitions."""

# WAL-E's tar_partition.partition(): top-level files never archived, top-level directories
# archived without their contents, directories anywhere archived without their contents.
EXCLUDED_TOP_FILES = frozenset(
    {
        "postmaster.pid",
        "postmaster.opts",
        "postgresql.conf",
        "pg_hba.conf",
        "recovery.conf",
        "recovery.done",
        "pg_ident.conf",
        "promote",
    }
)
EMPTIED_TOP_DIRS = frozenset({"pg_xlog", "pg_log", "pg_replslot", "pg_wal"})
EMPTIED_ANY_DIRS = frozenset({"pgsql_tmp", "pg_stat_tmp", ".wal-e"})


class WaleWorldError(RuntimeError):
    """A base backup, a WAL switch or an archive check did not work out."""


class PostgresHost(Protocol):
    """A running PostgreSQL 15 this module can back up (commands run as its OS user)."""

    pgdata: str
    """Its data directory (WAL-E's `spec.base_prefix`)."""
    socket_dir: str
    port: int

    def popen_as_postgres(self, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        """Start `argv` as the server's OS user; stdout and stderr are pipes."""
        ...

    def psql(self, sql: str) -> str:
        """Run SQL as the superuser; unaligned tuples-only output without final newline."""
        ...


# ---------------------------------------------------------------- where the archive lives


@dataclass(frozen=True)
class ArchiveTarget:
    """One service's WAL-E archive: `s3://<bucket>/backups/<service_guid>/wal/` on an S3
    endpoint reachable from wherever PostgreSQL runs."""

    endpoint_url: str
    """`http://host:port` (for VMs: the bridge address, not 127.0.0.1)."""
    bucket: str
    service_guid: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    region: str = "us-east-1"

    def __post_init__(self) -> None:
        if not GUID_RE.match(self.service_guid):
            raise ValueError(f"service GUID {self.service_guid!r} is not a lowercase UUID")
        if not re.match(r"^https?://[^/]+$", self.endpoint_url):
            raise ValueError(f"endpoint {self.endpoint_url!r} must be http(s)://host:port")

    @classmethod
    def on(cls, server: Any, bucket: str, service_guid: str | None = None) -> ArchiveTarget:
        """A target on a `tests.objectstores.servers.S3Server` (a new GUID unless given)."""
        return cls(
            endpoint_url=server.endpoint_url,
            bucket=bucket,
            service_guid=service_guid or str(uuid.uuid4()),
            access_key=server.access_key,
            secret_key=server.secret_key,
            region=server.region,
        )

    def for_service(self, service_guid: str) -> ArchiveTarget:
        """Same store and credentials, another service's prefix."""
        return ArchiveTarget(
            self.endpoint_url, self.bucket, service_guid, self.access_key, self.secret_key,
            self.region,
        )  # fmt: skip

    @property
    def layout(self) -> Layout:
        return Layout.for_service(self.service_guid)

    @property
    def prefix(self) -> str:
        """`backups/<guid>/wal/`"""
        return self.layout.prefix

    @property
    def url(self) -> str:
        """`s3://<bucket>/backups/<guid>/wal/` (WAL-E's WALE_S3_PREFIX, as Dingo sets it)."""
        return f"s3://{self.bucket}/{self.prefix}"

    def envdir_values(self) -> dict[str, str]:
        """The WAL-E environment (envdir file name → value) for `walcmd.py --envdir`."""
        return {
            "WALE_S3_PREFIX": self.url,
            "WALE_S3_ENDPOINT": self.endpoint_url.replace("://", "+path://", 1),
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
        }

    def client(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
        )

    def exists(self, key: str) -> bool:
        try:
            self.client().head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def list_keys(self, under: str = "") -> list[str]:
        """Every key under `<prefix><under>`, sorted."""
        paginator = self.client().get_paginator("list_objects_v2")
        found = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + under):
            found += [obj["Key"] for obj in page.get("Contents", [])]
        return sorted(found)


def write_envdir(directory: Path, target: ArchiveTarget, *, uid: int, gid: int) -> None:
    """(Re)write the envdir `walcmd.py --envdir` reads: directory 0700, files 0600, owned by
    the server's OS user. Each file is replaced atomically, so an archive_command running
    meanwhile sees either the old or the new prefix, never half a file."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    _chown(directory, uid, gid)
    directory.chmod(0o700)
    for name, value in target.envdir_values().items():
        tmp = directory / f".{name}.tmp"
        tmp.write_text(value + "\n")
        tmp.chmod(0o600)
        _chown(tmp, uid, gid)
        tmp.replace(directory / name)


def _chown(path: Path, uid: int, gid: int) -> None:
    shutil.chown(path, uid, gid)


def archive_command(script: str, envdir: str, *, python: str = SYSTEM_PYTHON) -> str:
    """The `archive_command` value (PostgreSQL substitutes %p and %f); no secret in it."""
    return (
        " ".join([shlex.quote(python), shlex.quote(script), "--envdir", shlex.quote(envdir)])
        + " push %p %f"
    )


def restore_command(script: str, envdir: str, *, python: str = SYSTEM_PYTHON) -> str:
    """A `restore_command` value that fetches from the archive (`walcmd.py fetch`)."""
    return (
        " ".join([shlex.quote(python), shlex.quote(script), "--envdir", shlex.quote(envdir)])
        + " fetch %f %p"
    )


# ---------------------------------------------------------------- base backups


@dataclass(frozen=True)
class BaseBackup:
    """What `make_base_backup` uploaded."""

    name: str
    """`base_<start WAL file>_<8-digit decimal offset>`"""
    start_lsn: str
    stop_lsn: str
    timeline: int
    start_segment: str
    start_offset: int
    stop_segment: str
    """As WAL-E stored it (`pg_walfile_name_offset` of the stop LSN)."""
    stop_offset: int
    sysid: str
    """Database system identifier (decimal text)."""
    partitions: tuple[str, ...]
    """Keys of `tar_partitions/part_XXXXXXXX.tar.lzo`, in order."""
    members: tuple[str, ...]
    """Tar member names across the partitions, in order."""
    expanded_size_bytes: int
    version: str
    sentinel: dict[str, Any]


def wale_keeps(name: str) -> bool:
    """Whether WAL-E's partitioner archives tar member `name` (relative to the data dir)."""
    parts = [p for p in name.strip("/").split("/") if p not in ("", ".")]
    if not parts:
        return False
    if len(parts) == 1 and parts[0] in EXCLUDED_TOP_FILES:
        return False
    if len(parts) > 1 and parts[0] in EMPTIED_TOP_DIRS:
        return False
    return not any(p in EMPTIED_ANY_DIRS for p in parts[:-1])


def _label_field(label: str, key: str) -> str:
    match = re.search(rf"^{key}: (.+)$", label, re.MULTILINE)
    if not match:
        raise WaleWorldError(f"backup_label has no {key}:\n{label}")
    return match.group(1).strip()


class _Partitioner:
    """Writes tar members into numbered partitions of at most `max_size` member bytes
    (WAL-E's rule: a member that would reach the limit starts a new partition)."""

    def __init__(self, workdir: Path, max_size: int) -> None:
        self.workdir = workdir
        self.max_size = max_size
        self.index = -1
        self.bytes = 0
        self.tar: tarfile.TarFile | None = None
        self.done: list[Path] = []
        self.members: list[str] = []
        self.total = 0

    def add(self, info: tarfile.TarInfo, data: Any) -> None:
        if info.size > self.max_size:
            raise WaleWorldError(
                f"{info.name} is {info.size} bytes, more than the partition size "
                f"{self.max_size} (WAL-E refuses this too: TarMemberTooBigError)"
            )
        if self.tar is None or (self.bytes + info.size >= self.max_size and self.bytes > 0):
            self._next()
        assert self.tar is not None
        self.tar.addfile(info, data)
        self.bytes += info.size
        self.total += info.size
        self.members.append(info.name)

    def _next(self) -> None:
        self.close()
        self.index += 1
        self.bytes = 0
        path = self.workdir / f"part_{self.index:08d}.tar"
        self.tar = tarfile.open(path, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self.done.append(path)

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None


def lzop_file(source: Path, dest: Path) -> None:
    with source.open("rb") as src, dest.open("wb") as out:
        proc = subprocess.run(
            ["lzop", "--stdout"], stdin=src, stdout=out, stderr=subprocess.PIPE, check=False
        )
    if proc.returncode != 0:
        raise WaleWorldError(f"lzop failed: {proc.stderr.decode(errors='replace')}")


def read_lzop_object(target: ArchiveTarget, key: str) -> bytes:
    """Download `key` and decompress it with `lzop -d` (raises if lzop rejects it)."""
    body = target.client().get_object(Bucket=target.bucket, Key=key)["Body"].read()
    proc = subprocess.run(["lzop", "-d", "--stdout", "-"], input=body, capture_output=True,
                          check=False)  # fmt: skip
    if proc.returncode != 0:
        raise WaleWorldError(f"lzop -d {key}: {proc.stderr.decode(errors='replace').strip()}")
    return bytes(proc.stdout)


def _backup_history_stop(target: ArchiveTarget, start_segment: str, start: int) -> str:
    # pg_basebackup -X none prints no end point; PostgreSQL's backup history file
    # (`<start segment>.<start offset, 8 hex>.backup`, archived before pg_basebackup returns)
    # has it, as WAL-E's `pg_stop_backup()` result had.
    name = f"{start_segment}.{start % WAL_SEGMENT_SIZE:08X}.backup"
    text = read_lzop_object(target, target.layout.wal_object(name)).decode()
    return _label_field(text, "STOP WAL LOCATION").split()[0]


def make_base_backup(
    pg: PostgresHost,
    target: ArchiveTarget,
    *,
    partition_size: int = PARTITION_MAX_SZ,
    workdir: Path | None = None,
    timeout: float = 300.0,
) -> BaseBackup:
    """Take a real base backup of `pg` and upload it to `target` in WAL-E's layout.

    Needs archiving into `target` to work already: `pg_basebackup -X none` waits until the
    WAL up to the backup's end (and the `.backup` history file) is archived, so when this
    returns the backup is restorable from the archive alone.
    """
    layout = target.layout
    client = target.client()
    sysid = pg.psql("SELECT system_identifier FROM pg_control_system()").strip()
    version = pg.psql("SELECT version()").strip()
    if not sysid.isdigit():
        raise WaleWorldError(f"unexpected system identifier {sysid!r}")
    # Dingo's patroni uploads sysids/sysid first (`pg_controldata | … | awk '{print $1}'`).
    client.put_object(Bucket=target.bucket, Key=layout.sysid, Body=f"{sysid}\n".encode())

    label_text = f"wal-e-world {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"
    # -X none: WAL comes from the archive, as with WAL-E; -v only for the error message.
    argv = [
        f"{PG_BINDIR}/pg_basebackup", "-h", pg.socket_dir, "-p", str(pg.port), "-U", "postgres",
        "-D", "-", "-Ft", "-X", "none", "--no-manifest", "-c", "fast", "-v", "-l", label_text,
    ]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="wale-basebackup-", dir=workdir) as tmp:
        work = Path(tmp)
        parts = _Partitioner(work, partition_size)
        label = ""
        proc = pg.popen_as_postgres(argv)
        stdout, stderr = proc.stdout, proc.stderr
        if stdout is None or stderr is None:
            raise WaleWorldError("popen_as_postgres must give stdout and stderr pipes")
        stderr_chunks: list[bytes] = []
        # stderr is drained on a thread: pg_basebackup may warn while we read the tar.
        reader = threading.Thread(target=lambda: stderr_chunks.append(stderr.read()))
        reader.start()
        watchdog = threading.Timer(timeout, proc.kill)
        watchdog.start()
        try:
            with tarfile.open(fileobj=stdout, mode="r|") as stream:
                for info in stream:
                    data = stream.extractfile(info) if info.isfile() else None
                    if info.name.lstrip("./") == "backup_label" and data is not None:
                        # Read it here (the stream moves on) and keep it in the backup:
                        # PostgreSQL needs it to start recovery from the right checkpoint.
                        raw = data.read()
                        label = raw.decode()
                        data = BytesIO(raw)
                    if wale_keeps(info.name):
                        parts.add(info, data)
            code = proc.wait(timeout=timeout)
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            reader.join(timeout=10)
            stdout.close()
            stderr.close()
            parts.close()
        errors = b"".join(stderr_chunks).decode(errors="replace")
        if code != 0:
            raise WaleWorldError(f"pg_basebackup exited {code}: {errors.strip()[-2000:]}")
        if not label:
            raise WaleWorldError("pg_basebackup's tar had no backup_label")
        timeline = int(_label_field(label, "START TIMELINE"))
        start = parse_lsn(_label_field(label, "START WAL LOCATION").split()[0])
        start_segment = walfile_containing(timeline, start)
        stop_text = _backup_history_stop(target, start_segment, start)
        stop = parse_lsn(stop_text)
        # WAL-E's name: pg_walfile_name_offset(pg_start_backup()); the start LSN is a
        # checkpoint's redo point, never on a segment boundary, so both conventions agree.
        start_offset = start % WAL_SEGMENT_SIZE
        stop_segment, stop_offset = walfile_name_offset(timeline, stop)
        name = layout.backup_name(start_segment, start_offset)

        client.put_object(
            Bucket=target.bucket, Key=layout.extended_version(name), Body=version.encode(),
            ContentType="text/plain",
        )  # fmt: skip
        keys = []
        for index, tar_path in enumerate(parts.done):
            lzo = tar_path.with_suffix(".tar.lzo")
            lzop_file(tar_path, lzo)
            tar_path.unlink()
            key = layout.partition(name, index)
            client.upload_file(str(lzo), target.bucket, key)
            lzo.unlink()
            keys.append(key)
        sentinel = {
            "wal_segment_backup_stop": stop_segment,
            "wal_segment_offset_backup_stop": f"{stop_offset:08d}",
            "expanded_size_bytes": parts.total,
            "spec": {"base_prefix": pg.pgdata.rstrip("/") + "/", "tablespaces": []},
        }
        client.put_object(
            Bucket=target.bucket, Key=layout.sentinel(name), Body=json.dumps(sentinel).encode(),
            ContentType="application/json",
        )  # fmt: skip
    return BaseBackup(
        name=name,
        start_lsn=_label_field(label, "START WAL LOCATION").split()[0],
        stop_lsn=stop_text,
        timeline=timeline,
        start_segment=start_segment,
        start_offset=start_offset,
        stop_segment=stop_segment,
        stop_offset=stop_offset,
        sysid=sysid,
        partitions=tuple(keys),
        members=tuple(parts.members),
        expanded_size_bytes=parts.total,
        version=version,
        sentinel=sentinel,
    )


# ---------------------------------------------------------------- WAL switches, the window


def wait_archived(target: ArchiveTarget, wal_file: str, *, timeout: float = 90.0) -> None:
    """Poll the archive until `wal_005/<wal_file>.lzo` exists."""
    key = target.layout.wal_object(wal_file)
    deadline = time.monotonic() + timeout
    while not target.exists(key):
        if time.monotonic() > deadline:
            raise WaleWorldError(f"{wal_file} not archived to {target.url} within {timeout:.0f}s")
        time.sleep(0.2)


def switch_wal_and_wait(pg: PostgresHost, target: ArchiveTarget, *, timeout: float = 90.0) -> str:
    """`pg_switch_wal()` on `pg` (a primary) and wait until the segment it closed is in the
    archive; returns that segment's name. Everything committed before the call is then
    restorable from the archive."""
    segment = pg.psql("SELECT pg_walfile_name(pg_switch_wal())").strip()
    if not SEGMENT_RE.match(segment):
        raise WaleWorldError(f"pg_switch_wal gave {segment!r}")
    wait_archived(target, segment, timeout=timeout)
    return segment


def drain_archive(pg: PostgresHost, *, timeout: float = 90.0) -> str:
    """Close the current segment and wait until the archiver has nothing left to do (no
    `.ready` file), wherever it archives to; returns the closed segment. Done before pointing
    archiving at another prefix, so the new archive starts clean (no stray older segment)."""
    segment = pg.psql("SELECT pg_walfile_name(pg_switch_wal())").strip()
    # A checkpoint marks for archiving the old segments that have no archive status yet
    # (written before archive_mode was on, kept by wal_keep_size or a slot); without it the
    # next checkpoint — the base backup's — would queue them for the new prefix.
    pg.psql("CHECKPOINT")
    deadline = time.monotonic() + timeout
    query = "SELECT count(*) FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready'"
    while (pending := pg.psql(query).strip()) != "0":
        if time.monotonic() > deadline:
            raise WaleWorldError(f"{pending} WAL files still waiting to be archived")
        time.sleep(0.2)
    return segment


@dataclass(frozen=True)
class ArchiveWindow:
    """What the archive holds (from a listing)."""

    backups: tuple[str, ...]
    """Complete base backups (with a stop sentinel), oldest first."""
    segments: tuple[str, ...]
    """WAL segment files in `wal_005/` (no .history/.backup/.partial), sorted."""
    history: tuple[str, ...]
    """Timeline history and backup history files in `wal_005/` (names without `.lzo`)."""
    sysid: str | None

    @property
    def first(self) -> str | None:
        return self.segments[0] if self.segments else None

    @property
    def last(self) -> str | None:
        return self.segments[-1] if self.segments else None

    def gaps(self, timeline: int | None = None, *, since: str | None = None) -> list[str]:
        """Segments of `timeline` missing between the first archived one (or `since`, e.g. a
        base backup's start segment) and the last archived one. The timeline defaults to
        `since`'s (else the newest archived one): a cluster that went through earlier
        point-in-time recoveries archives on timeline 10, not 1.

        Segments older than an archive's first base backup may sit alone before a gap:
        PostgreSQL queues segments written before archiving was switched on at a later
        checkpoint. Pass `since` to look only at what a restore of that backup needs."""
        floor = segment_number(since) if since else -1
        if timeline is None:
            names = [since] if since else sorted(self.segments)[-1:]
            timeline = int(names[0][:8], 16) if names else 1
        numbers = sorted(
            segment_number(s)
            for s in self.segments
            if int(s[:8], 16) == timeline and segment_number(s) >= floor
        )
        if not numbers:
            return []
        have = set(numbers)
        return [
            segment_name(timeline, n) for n in range(numbers[0], numbers[-1] + 1) if n not in have
        ]


def archive_window(target: ArchiveTarget) -> ArchiveWindow:
    layout = target.layout
    backups: list[str] = []
    segments: list[str] = []
    history: list[str] = []
    for key in target.list_keys():
        rel = key[len(layout.prefix) :]
        if rel.startswith("basebackups_005/") and rel.endswith("_backup_stop_sentinel.json"):
            backups.append(rel[len("basebackups_005/") : -len("_backup_stop_sentinel.json")])
        elif rel.startswith("wal_005/") and rel.endswith(".lzo"):
            name = rel[len("wal_005/") : -len(".lzo")]
            (segments if SEGMENT_RE.match(name) else history).append(name)
    sysid = None
    if target.exists(layout.sysid):
        body = target.client().get_object(Bucket=target.bucket, Key=layout.sysid)["Body"].read()
        sysid = body.decode().strip()
    return ArchiveWindow(tuple(sorted(backups)), tuple(sorted(segments)), tuple(sorted(history)),
                         sysid)  # fmt: skip
