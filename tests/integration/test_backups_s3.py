"""Backups in S3: list, select, download, decrypt against real S3 servers and real tools.

moto serves the functional cases (fast, no auth); SeaweedFS, a real S3 gateway that enforces
signatures, serves the download, resume, CLI and refused-credential cases. Every backup is made
by gzip | openssl enc -aes256 -md md5 -pass file: | split and uploaded with boto3; the expected
output comes from the runbook's own `cat $(ls -1v …) | openssl enc -d … | gunzip`.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from pydantic import SecretStr

from pgrecovery.adapters.objectstore import ObjectStore
from pgrecovery.backups.cached_source import CachedStoreSource
from pgrecovery.backups.config import Digest, EncryptionKey, S3Credentials, S3Location
from pgrecovery.backups.download import download_backup, part_is_complete
from pgrecovery.backups.listing import list_backups, select_backup
from pgrecovery.backups.pipeline import check_key, decrypt_stream
from pgrecovery.backups.progress import Progress
from pgrecovery.backups.sink import write_stream_to_file
from pgrecovery.backups.sources import StorePartsSource
from pgrecovery.backups.stores import open_s3_store
from pgrecovery.errors import (
    BackupCorrupt,
    BackupIncomplete,
    BackupNotFound,
    StoreAccessDenied,
    WrongKey,
)
from tests.objectstores.a9sbackup import MadeBackup, make_backup, manual_decrypt, upload_s3
from tests.objectstores.dumpgen import write_dump
from tests.objectstores.rss import run_measured
from tests.objectstores.servers import S3Server

pytestmark = pytest.mark.integration

# The servers are session fixtures from tests/objectstores/fixtures.py (via conftest).

GUID = "de2fe9e4-6535-423d-8709-dca87df7985c"
OLD = f"{GUID}-1700000000000"
LATEST = f"{GUID}-1740130000123"
SHA_GUID = "5aa0a0a0-0000-4000-8000-00000000a256"
GAP_GUID = "6bb0b0b0-0000-4000-8000-0000000000ga"
FLIP_GUID = "7cc0c0c0-0000-4000-8000-00000000f11b"
TRUNC_GUID = "8dd0d0d0-0000-4000-8000-0000000000cu"
TAIL_GUID = "9ee0e0e0-0000-4000-8000-00000000ta11"
KEY = b"NYHD8MVmA55HEqoaYHpQaxfwEMcQ1wkI"
PART_SIZE = 16 * 1024  # ~250 KiB compressed -> 15+ parts, so -10 sorts after -9
# The memory goal of `pgrecovery backups decrypt`, from any source, for any backup size.
RSS_GOAL_MIB = 100


@dataclass(frozen=True)
class Corpus:
    root: Path
    key_file: Path
    latest: MadeBackup
    old: MadeBackup
    sha: MadeBackup
    gap: MadeBackup
    flip: MadeBackup
    trunc: MadeBackup
    tail: MadeBackup
    expected: bytes
    expected_old: bytes


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("s3corpus")
    key_file = root / "key"
    key_file.write_bytes(KEY + b"\n")
    plain, plain_old = root / "dump.sql", root / "old.sql"
    write_dump(plain, 900_000, seed=11)
    write_dump(plain_old, 100_000, seed=12)
    store = root / "store"
    latest = make_backup(plain, store, LATEST, key_file, part_size=PART_SIZE)
    old = make_backup(plain_old, store, OLD, key_file, part_size=PART_SIZE, metadata=False)
    sha = make_backup(
        plain_old, store, f"{SHA_GUID}-1740000000000", key_file, part_size=PART_SIZE,
        md="sha256", index_start=1,
    )  # fmt: skip
    gap = make_backup(plain, store, f"{GAP_GUID}-1740000000000", key_file, part_size=PART_SIZE)
    gap.files[5].unlink()
    flip = make_backup(plain, store, f"{FLIP_GUID}-1740000000000", key_file, part_size=PART_SIZE)
    damaged = bytearray(flip.files[6].read_bytes())
    damaged[len(damaged) // 2] ^= 0x20
    flip.files[6].write_bytes(damaged)
    trunc = make_backup(plain, store, f"{TRUNC_GUID}-1740000000000", key_file, part_size=PART_SIZE)
    trunc.files[-1].write_bytes(trunc.files[-1].read_bytes()[:-100])
    # The last part never arrived; its metadata says how many there are.
    tail = make_backup(plain, store, f"{TAIL_GUID}-1740000000000", key_file, part_size=PART_SIZE)
    tail.files[-1].unlink()
    manual_decrypt(latest.files, key_file, root / "expected.sql")
    manual_decrypt(old.files, key_file, root / "expected_old.sql")
    expected = (root / "expected.sql").read_bytes()
    assert expected == plain.read_bytes()  # the runbook pipeline gives back the dump
    return Corpus(
        root, key_file, latest, old, sha,
        MadeBackup(gap.backup_id, tuple(f for f in gap.files if f.exists()), gap.metadata),
        flip, trunc,
        MadeBackup(tail.backup_id, tuple(f for f in tail.files if f.exists()), tail.metadata),
        expected, (root / "expected_old.sql").read_bytes(),
    )  # fmt: skip


def _upload_all(server: S3Server, corpus: Corpus, *, prefix: str = "") -> str:
    bucket = server.new_bucket()
    client = server.client()
    for made in (
        corpus.latest,
        corpus.old,
        corpus.sha,
        corpus.gap,
        corpus.flip,
        corpus.trunc,
        corpus.tail,
    ):
        upload_s3(client, bucket, made, prefix=prefix)
    for junk in (f"{GUID}-notes.txt", f"{GUID}-1740130000123-x", "README"):
        client.put_object(Bucket=bucket, Key=prefix + junk, Body=b"not a backup")
    return bucket


@pytest.fixture(scope="module")
def moto_bucket(moto_s3: S3Server, corpus: Corpus) -> str:
    return _upload_all(moto_s3, corpus)


@pytest.fixture(scope="module")
def seaweed_bucket(seaweedfs_s3: S3Server, corpus: Corpus) -> str:
    return _upload_all(seaweedfs_s3, corpus, prefix="a9s/")


async def _store(server: S3Server, bucket: str, *, secret: str | None = None) -> ObjectStore:
    return await open_s3_store(
        S3Location(bucket, server.region, server.endpoint_url),
        S3Credentials(server.access_key, SecretStr(secret or server.secret_key)),
    )


async def _collect(stream: AsyncIterator[bytes]) -> bytes:
    return b"".join([piece async for piece in stream])


def _key() -> EncryptionKey:
    return EncryptionKey.from_bytes(KEY)


async def test_list_and_select_latest(moto_s3: S3Server, moto_bucket: str, corpus: Corpus) -> None:
    store = await _store(moto_s3, moto_bucket)
    try:
        listing = await list_backups(store, GUID)
    finally:
        await store.close()
    assert [b.backup_id for b in listing.backups] == [OLD, LATEST]
    latest = select_backup(listing)
    assert latest.backup_id == LATEST
    assert latest.part_count == len(corpus.latest.files) >= 12
    # Natural order: …-9, -10, -11, not the key order -1, -10, -11, -2.
    assert [p.index for p in latest.parts] == list(range(latest.part_count))
    assert latest.total_size == sum(f.stat().st_size for f in corpus.latest.files)
    assert latest.has_metadata
    assert not listing.backups[0].has_metadata
    assert latest.taken_at.isoformat() == "2025-02-21T09:26:40.123000+00:00"
    assert {i.key for i in listing.ignored} == {f"{GUID}-notes.txt", f"{GUID}-1740130000123-x"}


async def test_stream_from_store_equals_manual_pipeline(
    moto_s3: S3Server,
    moto_bucket: str,
    corpus: Corpus,
) -> None:
    store = await _store(moto_s3, moto_bucket)
    try:
        backup = select_backup(await list_backups(store, GUID))
        source = StorePartsSource(store, backup, chunk_size=20_000, read_ahead=4)
        assert (await check_key(source, _key())).digest is Digest.MD5
        assert await _collect(decrypt_stream(source, _key())) == corpus.expected
        older = select_backup(await list_backups(store, GUID), OLD)
        older_out = await _collect(decrypt_stream(StorePartsSource(store, older), _key()))
        assert older_out == corpus.expected_old
    finally:
        await store.close()


async def test_sha256_backup_auto_and_explicit_md5(
    moto_s3: S3Server,
    moto_bucket: str,
    corpus: Corpus,
) -> None:
    store = await _store(moto_s3, moto_bucket)
    try:
        backup = select_backup(await list_backups(store, SHA_GUID))
        assert backup.parts[0].index == 1  # numbered from 1
        out = await _collect(decrypt_stream(StorePartsSource(store, backup), _key()))
        assert out == corpus.expected_old
        with pytest.raises(WrongKey, match="only with digest sha256, but digest md5 was requested"):
            await _collect(
                decrypt_stream(StorePartsSource(store, backup), _key(), digest=Digest.MD5)
            )
    finally:
        await store.close()


async def test_bad_inputs_with_clear_messages(
    moto_s3: S3Server, moto_bucket: str, corpus: Corpus
) -> None:
    store = await _store(moto_s3, moto_bucket)
    try:
        listing = await list_backups(store, GUID)
        with pytest.raises(WrongKey) as wrong:
            await _collect(
                decrypt_stream(
                    StorePartsSource(store, select_backup(listing)),
                    EncryptionKey.from_bytes(b"not-the-key"),
                )
            )
        assert str(wrong.value) == (
            "the encryption key does not decrypt this backup (first block is not gzip); "
            "check spec.source.encryption.keySecretRef"
        )
        with pytest.raises(BackupNotFound, match=f"backup {GUID}-1740130000999 not found in s3://"):
            select_backup(listing, f"{GUID}-1740130000999")
        with pytest.raises(BackupIncomplete, match=r"part\(s\) 5 missing: found parts 0-4, 6-"):
            select_backup(await list_backups(store, GAP_GUID))
        with pytest.raises(BackupIncomplete, match=r"not 16 \+ a multiple of 16.*is truncated"):
            select_backup(await list_backups(store, TRUNC_GUID))
        # A missing last part is named as missing (the metadata says how many), not as a
        # truncated second-to-last one.
        with pytest.raises(BackupIncomplete) as tail:
            select_backup(await list_backups(store, TAIL_GUID))
        found = len(corpus.tail.files)
        assert (
            f"the last 1 part(s) missing: {TAIL_GUID}-1740000000000.json lists {found + 1} "
            f"parts, found {found} (missing: {TAIL_GUID}-1740000000000-{found})"
        ) in str(tail.value), str(tail.value)
        assert "truncated" not in str(tail.value)
        flip = select_backup(await list_backups(store, FLIP_GUID))
        with pytest.raises(BackupCorrupt, match="damaged in storage or in transfer") as corrupt:
            await _collect(decrypt_stream(StorePartsSource(store, flip), _key()))
        assert "gzip" in str(corrupt.value)
        unknown = await list_backups(store, "99999999-0000-4000-8000-000000000000")
        with pytest.raises(
            BackupNotFound, match=r"no backups for backup GUID 99999999-.*other GUIDs"
        ):
            select_backup(unknown)
    finally:
        await store.close()


async def test_empty_and_missing_bucket(moto_s3: S3Server) -> None:
    store = await _store(moto_s3, moto_s3.new_bucket("empty"))
    try:
        with pytest.raises(BackupNotFound, match="is empty: no backups at all"):
            select_backup(await list_backups(store, GUID))
    finally:
        await store.close()
    store = await _store(moto_s3, "no-such-bucket-pgr")
    try:
        with pytest.raises(BackupNotFound, match="NoSuchBucket"):
            await list_backups(store, GUID)
    finally:
        await store.close()


async def test_read_range_into_direct_and_through_read(
    seaweedfs_s3: S3Server,
    seaweed_bucket: str,
    corpus: Corpus,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The S3 adapter receives a body straight into the buffer; a body it does not recognise
    (e.g. a checksumming wrapper) is read with read(n): same bytes, and a short or long body
    is an error either way."""
    import pgrecovery.adapters.s3 as s3_adapter  # noqa: PLC0415 - patched below

    store = await _store(seaweedfs_s3, seaweed_bucket)
    key = f"a9s/{LATEST}-1"
    whole = corpus.latest.files[1].read_bytes()
    try:
        for start, size in ((0, len(whole)), (5, 1000), (len(whole) - 7, 7)):
            buffer = bytearray(size)
            await store.read_range_into(key, start, memoryview(buffer))  # type: ignore[attr-defined]
            assert bytes(buffer) == whole[start : start + size]

        class Wrapped:
            def __init__(self, body: object) -> None:
                self.body = body
                self.reads = 0

            def read(self, n: int) -> bytes:
                self.reads += 1
                return self.body.read(n)  # type: ignore[attr-defined, no-any-return]

            def close(self) -> None:
                self.body.close()  # type: ignore[attr-defined]

        wrapped: list[Wrapped] = []
        direct = s3_adapter._receive_into

        def through_read(body: object, buffer: memoryview) -> int:
            wrapped.append(Wrapped(body))
            return direct(wrapped[-1], buffer)

        monkeypatch.setattr(s3_adapter, "_receive_into", through_read)
        buffer = bytearray(len(whole) - 3)
        await store.read_range_into(key, 3, memoryview(buffer))  # type: ignore[attr-defined]
        assert bytes(buffer) == whole[3:]
        assert wrapped[-1].reads >= 2  # pieces, then the empty read at the end
    finally:
        await store.close()


async def test_download_resume_and_decrypt_from_seaweedfs(
    seaweedfs_s3: S3Server,
    seaweed_bucket: str,
    corpus: Corpus,
    tmp_path: Path,
) -> None:
    store = await open_s3_store(
        S3Location(seaweed_bucket, seaweedfs_s3.region, seaweedfs_s3.endpoint_url, "a9s/"),
        S3Credentials(seaweedfs_s3.access_key, SecretStr(seaweedfs_s3.secret_key)),
    )
    try:
        backup = select_backup(await list_backups(store, GUID, prefix="a9s/"))
        assert backup.parts[0].key == f"a9s/{LATEST}-0"
        seen: list[Progress] = []
        work = tmp_path / "work"
        first = await download_backup(
            store, backup, work, concurrency=6, range_size=16 * 1024, progress=seen.append
        )
        assert first.fetched_parts == backup.part_count
        assert seen[-1].parts_done == backup.part_count
        for made in corpus.latest.files:
            assert (work / made.name).read_bytes() == made.read_bytes()
        (work / backup.parts[3].name).unlink()
        second = await download_backup(store, backup, work)
        assert (second.fetched_parts, second.skipped_parts) == (1, backup.part_count - 1)
        written = await write_stream_to_file(
            decrypt_stream(second.source(), _key()), tmp_path / "out.dump"
        )
        assert written.sha256 == hashlib.sha256(corpus.expected).hexdigest()
        streamed = await _collect(decrypt_stream(StorePartsSource(store, backup), _key()))
        assert streamed == corpus.expected
    finally:
        await store.close()


async def test_cached_stream_keeps_parts_and_reuses_them_on_the_next_pass(
    seaweedfs_s3: S3Server,
    seaweed_bucket: str,
    corpus: Corpus,
    tmp_path: Path,
) -> None:
    """The overlapped pipeline's source: bytes equal the runbook's, every part is kept on the
    work volume in download_backup's format, a later pass reads kept parts from disk and fetches
    only the missing one, and a half-written part is fetched again from its start."""
    store = await open_s3_store(
        S3Location(seaweed_bucket, seaweedfs_s3.region, seaweedfs_s3.endpoint_url, "a9s/"),
        S3Credentials(seaweedfs_s3.access_key, SecretStr(seaweedfs_s3.secret_key)),
    )
    work = tmp_path / "parts"
    try:
        backup = select_backup(await list_backups(store, GUID, prefix="a9s/"))
        first = CachedStoreSource(store, backup, work, chunk_size=7_000, read_ahead=3)
        assert first.reused_parts == 0
        assert await _collect(decrypt_stream(first, _key())) == corpus.expected
        assert first.fetched_bytes == backup.total_size
        assert first.reused_bytes == 0
        assert all(part_is_complete(work, p) for p in backup.parts)
        for made in corpus.latest.files:
            assert (work / made.name).read_bytes() == made.read_bytes()

        lost = backup.parts[5]
        (work / lost.name).unlink()
        (work / (lost.name + ".partial")).write_bytes(b"half a part from a killed pass")
        second = CachedStoreSource(store, backup, work)
        assert second.reused_parts == backup.part_count - 1
        assert await _collect(decrypt_stream(second, _key())) == corpus.expected
        assert second.fetched_bytes == lost.size
        assert second.reused_bytes == backup.total_size - lost.size
        assert part_is_complete(work, lost)
        assert (work / lost.name).read_bytes() == corpus.latest.files[5].read_bytes()
    finally:
        await store.close()


async def test_cached_stream_stops_cleanly_when_the_consumer_goes_away(
    moto_s3: S3Server, moto_bucket: str, tmp_path: Path
) -> None:
    store = await _store(moto_s3, moto_bucket)
    try:
        backup = select_backup(await list_backups(store, GUID))
        source = CachedStoreSource(store, backup, tmp_path / "parts", chunk_size=5_000)
        stream = decrypt_stream(source, _key())
        first = await anext(stream)
        assert first
        await stream.aclose()  # type: ignore[attr-defined]
        # Parts finished before the stop are kept; none is recorded complete half-written.
        for part in backup.parts:
            if part_is_complete(tmp_path / "parts", part):
                assert (tmp_path / "parts" / part.name).stat().st_size == part.size
    finally:
        await store.close()


async def test_refused_credentials_on_seaweedfs(
    seaweedfs_s3: S3Server,
    seaweed_bucket: str,
) -> None:
    store = await _store(seaweedfs_s3, seaweed_bucket, secret="wrong-secret")
    try:
        with pytest.raises(
            StoreAccessDenied, match=r"refused the credentials.*SignatureDoesNotMatch"
        ):
            await list_backups(store, GUID, prefix="a9s/")
    finally:
        await store.close()


def _cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[bytes]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AZURE_"))}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "pgrecovery.cli", *args],
        env=full_env, cwd=cwd, capture_output=True, check=False, timeout=120,
    )  # fmt: skip


def test_cli_list_fetch_decrypt(
    seaweedfs_s3: S3Server,
    seaweed_bucket: str,
    corpus: Corpus,
    tmp_path: Path,
) -> None:
    where = ["--s3-bucket", seaweed_bucket, "--prefix", "a9s/", "--guid", GUID]
    env = seaweedfs_s3.env()
    listed = _cli("backups", "list", *where, env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert f"{LATEST}   2025-02-21 09:26:40" in listed.stdout.decode()
    assert "<- latest" in listed.stdout.decode()
    # The same listing for scripts: -o yaml / -o json (and the older --json) agree.
    as_yaml = _cli("backups", "list", *where, "-o", "yaml", env=env, cwd=tmp_path)
    as_json = _cli("backups", "list", *where, "--json", env=env, cwd=tmp_path)
    assert as_yaml.returncode == 0, as_yaml.stderr
    assert yaml.safe_load(as_yaml.stdout) == json.loads(as_json.stdout)
    assert yaml.safe_load(as_yaml.stdout)["latest"] == LATEST

    # Straight from the store, key from a file.
    out = tmp_path / "direct.dump"
    done = _cli(
        "backups", "decrypt", *where, "--key-file", str(corpus.key_file), "-o", str(out),
        "--sha256", env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == corpus.expected
    assert hashlib.sha256(corpus.expected).hexdigest() in done.stderr.decode()

    # Fetch, then decrypt the directory, key from the environment, to stdout.
    fetched = _cli("backups", "fetch", *where, "--dir", str(tmp_path / "dl"), env=env, cwd=tmp_path)
    assert fetched.returncode == 0, fetched.stderr
    to_stdout = _cli(
        "backups", "decrypt", "--from-dir", str(tmp_path / "dl"), "-o", "-",
        env={"PGRECOVERY_ENCRYPTION_KEY": KEY.decode()}, cwd=tmp_path,
    )  # fmt: skip
    assert to_stdout.returncode == 0, to_stdout.stderr
    assert to_stdout.stdout == corpus.expected

    wrong = _cli(
        "backups", "decrypt", "--from-dir", str(tmp_path / "dl"), "-o", str(tmp_path / "x"),
        env={"PGRECOVERY_ENCRYPTION_KEY": "wrong"}, cwd=tmp_path,
    )  # fmt: skip
    assert wrong.returncode == 1
    assert b"WrongKey: the encryption key does not decrypt this backup" in wrong.stderr
    # The CLI user is told the flags they typed, not the manifest's fields.
    assert b"check --key-file / --key-env" in wrong.stderr, wrong.stderr
    assert b"spec." not in wrong.stderr
    assert not (tmp_path / "x").exists()

    nokey = _cli("backups", "decrypt", "--from-dir", str(tmp_path / "dl"), env={}, cwd=tmp_path)
    assert nokey.returncode == 1
    assert b"never taken from the command line" in nokey.stderr


def _cli_env(env: dict[str, str]) -> dict[str, str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AZURE_"))}
    full_env.update(env)
    return full_env


def test_cli_decrypt_from_seaweedfs_in_bounded_memory(
    seaweedfs_s3: S3Server, tmp_path: Path
) -> None:
    """A multi-part backup several times larger than the source's buffers, streamed from a real
    S3 server by the CLI: byte-exact, and the process's peak RSS stays under the goal, within
    a fixed allowance of what the same CLI takes to list the bucket (imports, S3 client)."""
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY + b"\n")
    plain = tmp_path / "dump.sql"
    write_dump(plain, 160 << 20, seed=31)
    big = f"{GUID}-1750000000000"
    made = make_backup(plain, tmp_path / "store", big, key_file, part_size=8 << 20)
    assert len(made.files) >= 5
    bucket = seaweedfs_s3.new_bucket("rss")
    upload_s3(seaweedfs_s3.client(), bucket, made)
    env = _cli_env(seaweedfs_s3.env())
    where = ["--s3-bucket", bucket, "--guid", GUID]
    cli = [sys.executable, "-m", "pgrecovery.cli", "backups"]

    listed, list_mib = run_measured([*cli, "list", *where], env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    out = tmp_path / "out.dump"
    done, peak_mib = run_measured(
        [*cli, "decrypt", *where, "--backup-id", big, "--key-file", str(key_file),
         "-o", str(out), "--sha256"],
        env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    digest = hashlib.sha256(plain.read_bytes()).hexdigest()
    assert digest in done.stderr.decode()
    assert out.stat().st_size == plain.stat().st_size
    # 12 MiB of range buffers, ~6 MiB of pipeline queues, the decrypt modules and the threads:
    # ~30 MiB over the listing; the 44 MB of ciphertext held whole would not fit.
    assert peak_mib - list_mib < 40, (peak_mib, list_mib)
    assert peak_mib < RSS_GOAL_MIB, (peak_mib, list_mib)
