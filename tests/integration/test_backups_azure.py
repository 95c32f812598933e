"""Backups in Azure Blob (Azurite): one blob `<guid>-<ms>` per backup, no metadata object.

Made with the real gzip | openssl enc -aes256 -md md5 -pass file:, uploaded with
azure-storage-blob, read back through pgrecovery's Azure adapter.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import SecretStr

from pgrecovery.adapters.objectstore import ObjectStore
from pgrecovery.backups.config import AzureCredentials, AzureLocation, EncryptionKey
from pgrecovery.backups.credentials import azure_credentials
from pgrecovery.backups.download import download_backup
from pgrecovery.backups.listing import list_backups, select_backup
from pgrecovery.backups.pipeline import decrypt_stream
from pgrecovery.backups.sink import write_stream_to_file
from pgrecovery.backups.sources import StorePartsSource
from pgrecovery.backups.stores import open_azure_store
from pgrecovery.errors import BackupCorrupt, BackupNotFound, StoreAccessDenied, WrongKey
from tests.objectstores.a9sbackup import MadeBackup, make_backup, manual_decrypt, upload_azure
from tests.objectstores.dumpgen import write_dump
from tests.objectstores.rss import run_measured
from tests.objectstores.servers import AzuriteServer

pytestmark = pytest.mark.integration

# The servers are session fixtures from tests/objectstores/fixtures.py (via conftest).

GUID = "b6f4c071-ef44-4af2-9608-531b4ce4823f"
OLD = f"{GUID}-1548967947154"
LATEST = f"{GUID}-1569935509279"
FLIP_GUID = "c7f4c071-ef44-4af2-9608-531b4ce4823f"
KEY = b"azure-backup-key"


@dataclass(frozen=True)
class Corpus:
    key_file: Path
    latest: MadeBackup
    old: MadeBackup
    flip: MadeBackup
    expected: bytes


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("azcorpus")
    key_file = root / "key"
    key_file.write_bytes(KEY + b"\n")
    plain = root / "dump.sql"
    write_dump(plain, 2_000_000, seed=21)
    store = root / "store"
    latest = make_backup(plain, store, LATEST, key_file, part_size=None, metadata=False)
    old = make_backup(plain, store, OLD, key_file, part_size=None, metadata=False)
    flip = make_backup(
        plain, store, f"{FLIP_GUID}-1569935509279", key_file, part_size=None, metadata=False
    )
    damaged = bytearray(flip.files[0].read_bytes())
    damaged[len(damaged) // 3] ^= 0x04
    flip.files[0].write_bytes(damaged)
    manual_decrypt(latest.files, key_file, root / "expected.sql")
    return Corpus(key_file, latest, old, flip, (root / "expected.sql").read_bytes())


@pytest.fixture(scope="module")
def container(azurite: AzuriteServer, corpus: Corpus) -> str:
    name = azurite.new_container()
    client = azurite.service().get_container_client(name)
    for made in (corpus.latest, corpus.old, corpus.flip):
        upload_azure(client, made)
    client.upload_blob(f"{GUID}-notes.txt", b"not a backup")
    return name


async def _store(server: AzuriteServer, container: str, *, key: str | None = None) -> ObjectStore:
    if key is None:
        creds = AzureCredentials(connection_string=SecretStr(server.connection_string))
    else:
        creds = AzureCredentials(account_name=server.account_name, account_key=SecretStr(key))
    return await open_azure_store(AzureLocation(container, server.account_url), creds)


async def _collect(stream: AsyncIterator[bytes]) -> bytes:
    return b"".join([piece async for piece in stream])


async def test_list_select_and_stream(
    azurite: AzuriteServer,
    container: str,
    corpus: Corpus,
) -> None:
    store = await _store(azurite, container)
    try:
        listing = await list_backups(store, GUID)
        assert [b.backup_id for b in listing.backups] == [OLD, LATEST]
        backup = select_backup(listing)
        assert backup.backup_id == LATEST
        assert backup.part_count == 1
        assert backup.parts[0].index is None
        assert not backup.has_metadata
        assert backup.total_size == corpus.latest.files[0].stat().st_size
        assert [i.key for i in listing.ignored] == [f"{GUID}-notes.txt"]
        source = StorePartsSource(store, backup, chunk_size=256 * 1024, read_ahead=4)
        assert (
            await _collect(decrypt_stream(source, EncryptionKey.from_bytes(KEY))) == corpus.expected
        )
    finally:
        await store.close()


async def test_download_in_concurrent_chunks_then_decrypt(
    azurite: AzuriteServer,
    container: str,
    corpus: Corpus,
    tmp_path: Path,
) -> None:
    store = await _store(azurite, container, key=azurite.account_key)  # account URL + key
    try:
        backup = select_backup(await list_backups(store, GUID), OLD)
        result = await download_backup(store, backup, tmp_path, concurrency=4, range_size=100_000)
        assert (tmp_path / OLD).read_bytes() == corpus.old.files[0].read_bytes()
        again = await download_backup(store, backup, tmp_path)
        assert again.skipped_parts == 1
        written = await write_stream_to_file(
            decrypt_stream(result.source(), EncryptionKey.from_bytes(KEY)), tmp_path / "o.dump"
        )
        assert written.sha256 == hashlib.sha256(corpus.expected).hexdigest()
    finally:
        await store.close()


async def test_bad_inputs(azurite: AzuriteServer, container: str) -> None:
    store = await _store(azurite, container)
    try:
        backup = select_backup(await list_backups(store, GUID))
        with pytest.raises(WrongKey, match=r"first block is not gzip\); check spec\.source"):
            await _collect(
                decrypt_stream(StorePartsSource(store, backup), EncryptionKey.from_bytes(b"x"))
            )
        flip = select_backup(await list_backups(store, FLIP_GUID))
        with pytest.raises(BackupCorrupt, match="damaged in storage or in transfer"):
            await _collect(
                decrypt_stream(StorePartsSource(store, flip), EncryptionKey.from_bytes(KEY))
            )
        with pytest.raises(BackupNotFound, match=f"backup {GUID}-1569935509280 not found"):
            select_backup(await list_backups(store, GUID), f"{GUID}-1569935509280")
        with pytest.raises(BackupNotFound, match="no backups for backup GUID 00000000-"):
            select_backup(await list_backups(store, "00000000-0000-4000-8000-000000000000"))
    finally:
        await store.close()
    empty = await _store(azurite, azurite.new_container("empty"))
    try:
        with pytest.raises(BackupNotFound, match="is empty: no backups at all"):
            select_backup(await list_backups(empty, GUID))
    finally:
        await empty.close()
    missing = await _store(azurite, "no-such-container")
    try:
        with pytest.raises(BackupNotFound, match="ContainerNotFound"):
            await list_backups(missing, GUID)
    finally:
        await missing.close()


async def test_refused_account_key(azurite: AzuriteServer, container: str) -> None:
    wrong = "QUJD" + azurite.account_key[4:]
    store = await _store(azurite, container, key=wrong)
    try:
        with pytest.raises(StoreAccessDenied, match="Azure refused the credentials"):
            await list_backups(store, GUID)
    finally:
        await store.close()


@pytest.mark.parametrize("names", [
    {"AZURE_STORAGE_KEY": "key", "AZURE_STORAGE_ACCOUNT": "account"},          # az CLI's names
    {"AZURE_STORAGE_ACCOUNT_KEY": b"key\n", "AZURE_STORAGE_ACCOUNT": b"account"},  # older Secret
    {"AZURE_STORAGE_CONNECTION_STRING": "connection"},
])
async def test_every_credential_name_reaches_the_store(
    azurite: AzuriteServer, container: str, names: dict[str, str | bytes]
) -> None:
    """The one parser (`backups.credentials`) that the operator's Secrets, local mode's
    secrets and the CLI's environment go through, against a real Azurite: each accepted name
    lists the backups (Secret values are bytes, with the newline `echo` leaves)."""
    real = {"key": azurite.account_key, "account": azurite.account_name,
            "connection": azurite.connection_string}
    values = {k: (real[v.decode().strip()].encode() + b"\n" if isinstance(v, bytes)
                  else real[v]) for k, v in names.items()}
    creds = azure_credentials(values, "Secret ns/store")
    store = await open_azure_store(AzureLocation(container, azurite.account_url), creds)
    try:
        listing = await list_backups(store, GUID)
        assert [b.backup_id for b in listing.backups] == [OLD, LATEST]
    finally:
        await store.close()


def test_cli_decrypt_from_azure(
    azurite: AzuriteServer,
    container: str,
    corpus: Corpus,
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AZURE_"))}
    env.update(azurite.env())
    out = tmp_path / "az.dump"
    done = subprocess.run(
        [sys.executable, "-m", "pgrecovery.cli", "backups", "decrypt", "--azure-container",
         container, "--guid", GUID, "--key-file", str(corpus.key_file), "-o", str(out)],
        env=env, capture_output=True, check=False, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == corpus.expected


def test_cli_decrypt_from_azurite_in_bounded_memory(azurite: AzuriteServer, tmp_path: Path) -> None:
    """One 44 MB blob streamed by the CLI in ranged reads: byte-exact, and the process's peak
    RSS stays under the goal (100 MiB), within a fixed allowance of what the same CLI takes
    to list the container (imports, Azure client)."""
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY + b"\n")
    plain = tmp_path / "dump.sql"
    write_dump(plain, 160 << 20, seed=32)
    big = f"{GUID}-1750000000000"
    made = make_backup(plain, tmp_path / "store", big, key_file, part_size=None, metadata=False)
    name = azurite.new_container("rss")
    upload_azure(azurite.service().get_container_client(name), made)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AZURE_"))}
    env.update(azurite.env())
    where = ["--azure-container", name, "--guid", GUID]
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
    assert hashlib.sha256(plain.read_bytes()).hexdigest() in done.stderr.decode()
    assert out.stat().st_size == plain.stat().st_size
    # 6 MiB of range buffers (+ the SDK's copy of each range in flight), ~6 MiB of pipeline
    # queues, the decrypt modules and the threads: ~30 MiB over the listing.
    assert peak_mib - list_mib < 40, (peak_mib, list_mib)
    assert peak_mib < 100, (peak_mib, list_mib)
