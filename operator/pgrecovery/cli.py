"""The `pgrecovery` command: local tools that work without Kubernetes.

Why this module exists: in a real disaster the Kubernetes cluster may be gone too, so every
building block of a recovery must also run from a shell. The command is a tree of groups
(`pgrecovery backups …`, later `pgrecovery recover …`, `pgrecovery demo …`); each group
registers itself in `GROUPS` with one function that adds its sub-parsers, so adding a group
touches nothing else.

Secrets never come from argv (visible in `ps` and shell history): the backup key is read
from a file (`--key-file`), an environment variable (`--key-env`, default
`PGRECOVERY_ENCRYPTION_KEY`) or a prompt; cloud credentials from each SDK's usual
environment/config (S3), or `AZURE_STORAGE_CONNECTION_STRING` / `AZURE_STORAGE_KEY` /
`AZURE_STORAGE_SAS_TOKEN` (Azure, as the az CLI names them).

Exit codes: 0 success, 1 a fatal recovery error (its reason and message are printed),
2 usage, 75 (EX_TEMPFAIL) a retryable error that outlasted the retries, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import importlib.metadata
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import yaml

from pgrecovery.adapters.objectstore import ObjectStore
from pgrecovery.backups.config import (
    AzureLocation,
    Digest,
    EncryptionKey,
    S3Location,
)
from pgrecovery.backups.listing import Backup, BackupListing, list_backups, select_backup
from pgrecovery.backups.localstore import LocalDirStore
from pgrecovery.backups.naming import guess_guid, parse_backup_id, validate_guid
from pgrecovery.backups.progress import Progress, human_size
from pgrecovery.cli_recover import register_cleanup, register_demo, register_recover
from pgrecovery.cli_status import register_status
from pgrecovery.errors import ConfigurationError, RecoveryError, SecretError

EX_TEMPFAIL = 75
DEFAULT_KEY_ENV = "PGRECOVERY_ENCRYPTION_KEY"

Handler = Callable[[argparse.Namespace], int]


# ------------------------------------------------------------------ progress bar


class ProgressBar:
    """A one-line progress bar on stderr, redrawn at most 5 times a second."""

    def __init__(self, label: str, *, enabled: bool, stream: TextIO | None = None) -> None:
        self.label = label
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self._started = time.monotonic()
        self._last_draw = 0.0
        self._last: Progress | None = None

    def __call__(self, progress: Progress) -> None:
        self._last = progress
        now = time.monotonic()
        if self.enabled and now - self._last_draw >= 0.2:
            self._last_draw = now
            self._draw(progress, now)

    def _draw(self, p: Progress, now: float) -> None:
        elapsed = max(now - self._started, 1e-6)
        rate = p.bytes_done / elapsed
        width = 24
        filled = int(width * min(p.fraction, 1.0))
        eta = (p.bytes_total - p.bytes_done) / rate if rate > 0 else 0.0
        out = f"  out {human_size(p.output_bytes)}" if p.output_bytes else ""
        line = (
            f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {p.fraction:4.0%} "
            f"{human_size(p.bytes_done)}/{human_size(p.bytes_total)} "
            f"parts {p.parts_done}/{p.parts_total} {human_size(rate)}/s "
            f"ETA {int(eta) // 60}:{int(eta) % 60:02d}{out}"
        )
        self.stream.write(line.ljust(110)[:160])
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._last is not None:
            self._draw(self._last, time.monotonic())
            self.stream.write("\n")
            self.stream.flush()


def _progress_enabled(args: argparse.Namespace) -> bool:
    if args.progress is not None:
        return bool(args.progress)
    return sys.stderr.isatty()


# ------------------------------------------------------------------ options


def _add_location_options(parser: argparse.ArgumentParser, *, allow_dir: bool,
                          has_backup_id: bool = True) -> None:
    where = parser.add_argument_group("where the backups are (choose one)")
    group = where.add_mutually_exclusive_group(required=True)
    group.add_argument("--s3-bucket", metavar="BUCKET", help="S3 bucket holding the backups")
    group.add_argument("--azure-container", metavar="NAME", help="Azure Blob container")
    if allow_dir:
        group.add_argument(
            "--from-dir", type=Path, metavar="DIR", help="a directory of downloaded parts"
        )
    where.add_argument("--prefix", default="", help="key prefix in front of the backup names")
    where.add_argument("--region", help="S3 region (default: from the AWS config)")
    where.add_argument(
        "--endpoint-url", help="S3-compatible endpoint (default: AWS; env AWS_ENDPOINT_URL)"
    )
    where.add_argument(
        "--account-url",
        help="Azure account URL, with AZURE_STORAGE_KEY or AZURE_STORAGE_SAS_TOKEN in the "
        "environment (default: AZURE_STORAGE_CONNECTION_STRING)",
    )
    parser.add_argument(
        "--guid",
        help="the backup GUID (a9s Backup Manager); optional when --backup-id is given"
        if has_backup_id else "the backup GUID (a9s Backup Manager); optional when the "
        "location holds the backups of one GUID only",
    )


def _add_progress_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar on stderr (default: when stderr is a terminal)",
    )


def _guid(args: argparse.Namespace) -> str | None:
    if args.guid:
        return validate_guid(args.guid, field="--guid")
    if getattr(args, "backup_id", None):
        return parse_backup_id(args.backup_id, field="--backup-id").guid
    return None


async def _open_store(args: argparse.Namespace) -> tuple[ObjectStore, str]:
    """The store named by the options, and the key prefix to use in it."""
    from pgrecovery.backups.stores import open_store  # noqa: PLC0415

    if getattr(args, "from_dir", None) is not None:
        return LocalDirStore(args.from_dir), ""
    if args.s3_bucket:
        endpoint = args.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        location = S3Location(args.s3_bucket, args.region, endpoint, args.prefix)
        # No credentials of ours: boto3 reads the AWS_* variables (and its other sources).
        return await open_store(location, None, "the environment"), location.prefix
    azure = AzureLocation(args.azure_container, args.account_url, args.prefix)
    return (await open_store(azure, os.environ, "the environment (with --account-url)"),
            azure.prefix)


async def _listing(args: argparse.Namespace, store: ObjectStore, prefix: str) -> BackupListing:
    guid = _guid(args)
    if guid is None:
        candidates = sorted(
            {g for o in await store.list(prefix) if (g := guess_guid(o.key[len(prefix) :]))}
        )
        if len(candidates) != 1:
            found = ", ".join(candidates[:10]) or "none"
            choose = "--guid or --backup-id" if hasattr(args, "backup_id") else "--guid"
            raise ConfigurationError(
                f"give {choose}: {store.description} holds backups of "
                f"{len(candidates)} GUIDs ({found})"
            )
        guid = candidates[0]
    return await list_backups(store, guid, prefix=prefix)


def read_key(args: argparse.Namespace) -> EncryptionKey:
    """The backup key from --key-file, the --key-env variable, or a prompt; never argv."""
    if args.key_file is not None:
        try:
            return EncryptionKey.from_file_content(Path(args.key_file).read_bytes())
        except OSError as exc:
            raise SecretError(f"cannot read the key file {args.key_file}: {exc.strerror}") from exc
    value = os.environ.get(args.key_env)
    if value:
        return EncryptionKey.from_file_content(value.encode())
    if sys.stdin.isatty():
        entered = getpass.getpass("backup encryption key: ")
        return EncryptionKey.from_bytes(entered.encode())
    raise SecretError(
        f"no backup encryption key: use --key-file PATH or set ${args.key_env} "
        "(it is never taken from the command line)"
    )


# ------------------------------------------------------------------ backups list


def _backup_row(b: Backup) -> dict[str, object]:
    return {
        "id": b.backup_id,
        "takenAt": b.taken_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "parts": b.part_count,
        "sizeBytes": b.total_size,
        "metadata": b.has_metadata,
        "complete": b.complete,
        "problems": list(b.problems),
        "notes": [n for n in b.notes if n != "no metadata object"],
    }


async def _cmd_list(args: argparse.Namespace) -> int:
    store, prefix = await _open_store(args)
    try:
        listing = await _listing(args, store, prefix)
    finally:
        await store.close()
    if args.output in ("json", "yaml"):
        document = {
            "guid": listing.guid,
            "location": listing.location,
            "backups": [_backup_row(b) for b in listing.backups],
            "latest": listing.latest.backup_id if listing.latest else None,
            "ignored": [{"key": i.key, "reason": i.reason} for i in listing.ignored],
        }
        if args.output == "json":
            print(json.dumps(document, indent=2))
        else:
            sys.stdout.write(yaml.safe_dump(document, sort_keys=False))
        return 0 if listing.backups else 1
    if not listing.backups:
        try:
            select_backup(listing)
        except RecoveryError as exc:
            print(f"pgrecovery: {exc}", file=sys.stderr)
        return 1
    print(f"backups of {listing.guid} in {listing.location} (oldest first):")
    print(f"  {'ID':<52} {'TAKEN (UTC)':<20} {'PARTS':>5} {'SIZE':>10}  META  STATUS")
    for b in listing.backups:
        status = "ok" if b.complete else "INCOMPLETE: " + "; ".join(b.problems)
        latest = "  <- latest" if b is listing.latest else ""
        print(
            f"  {b.backup_id:<52} {b.taken_at:%Y-%m-%d %H:%M:%S} {b.part_count:>5} "
            f"{human_size(b.total_size):>10}  {'yes' if b.has_metadata else 'no':<4}  "
            f"{status}{latest}"
        )
        for note in b.notes:
            if note != "no metadata object":
                print(f"  {'':<52} note: {note}")
    if listing.ignored:
        print(f"ignored {len(listing.ignored)} object(s) that are not parts of these backups:")
        for item in listing.ignored[:20]:
            print(f"  {item.key}: {item.reason}")
        if len(listing.ignored) > 20:
            print(f"  … and {len(listing.ignored) - 20} more")
    return 0


# ------------------------------------------------------------------ backups fetch


async def _cmd_fetch(args: argparse.Namespace) -> int:
    from pgrecovery.backups.download import download_backup  # noqa: PLC0415

    store, prefix = await _open_store(args)
    try:
        listing = await _listing(args, store, prefix)
        backup = select_backup(listing, args.backup_id)
        bar = ProgressBar(f"fetch {backup.backup_id}", enabled=_progress_enabled(args))
        try:
            result = await download_backup(
                store, backup, args.dir, concurrency=args.concurrency, progress=bar
            )
        finally:
            bar.close()
    finally:
        await store.close()
    print(
        f"backup {backup.backup_id} ({backup.taken_at:%Y-%m-%d %H:%M:%S} UTC): "
        f"{backup.part_count} part(s), {human_size(backup.total_size)} in {args.dir} "
        f"({result.fetched_parts} fetched, {result.skipped_parts} already complete)",
        file=sys.stderr,
    )
    return 0


# ------------------------------------------------------------------ backups decrypt


async def _cmd_decrypt(args: argparse.Namespace) -> int:
    from pgrecovery.backups.pipeline import decrypt_stream  # noqa: PLC0415
    from pgrecovery.backups.sink import (  # noqa: PLC0415
        write_stream_to_file,
        write_stream_to_fileobj,
    )
    from pgrecovery.backups.sources import (  # noqa: PLC0415
        CiphertextSource,
        LocalPartsSource,
        StorePartsSource,
    )

    key = read_key(args)
    to_stdout = str(args.output) == "-"
    if to_stdout and sys.stdout.isatty():
        raise ConfigurationError("refusing to write a dump to a terminal: use -o FILE or a pipe")
    store, prefix = await _open_store(args)
    try:
        listing = await _listing(args, store, prefix)
        backup = select_backup(listing, args.backup_id)
        source: CiphertextSource
        if isinstance(store, LocalDirStore):
            source = LocalPartsSource.for_backup(backup, store.directory)
        else:
            source = StorePartsSource(store, backup)
        output = None if to_stdout else (args.output or Path(f"{backup.backup_id}.dump"))
        bar = ProgressBar(f"decrypt {backup.backup_id}", enabled=_progress_enabled(args))
        stream = decrypt_stream(source, key, digest=Digest(args.digest), progress=bar)
        try:
            if output is None:
                written = await write_stream_to_fileobj(
                    stream, sys.stdout.buffer, sha256=args.sha256
                )
            else:
                written = await write_stream_to_file(stream, output, sha256=args.sha256)
        finally:
            bar.close()
    finally:
        await store.close()
    checksum = f", sha256 {written.sha256}" if written.sha256 else ""
    print(
        f"backup {backup.backup_id}: {backup.part_count} part(s) decrypted and verified "
        f"(padding, gzip CRC32 and length) -> {output or 'stdout'}, "
        f"{human_size(written.size)} ({written.size} bytes){checksum}",
        file=sys.stderr,
    )
    return 0


def _register_backups(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    backups = groups.add_parser(
        "backups",
        help="list, fetch and decrypt a9s-pg logical backups (S3, Azure Blob, local)",
        description="Work with a9s-pg logical backups: <guid>-<epoch-ms>[-<n>] objects, "
        "pg_dumpall | gzip | openssl enc -aes256, split into parts.",
    )
    commands = backups.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser(
        "list", help="list the backups of a GUID, newest last",
        description="List the backups of one backup GUID at a location, oldest first: id, "
        "time taken, parts, size, and what is wrong with an incomplete one (missing or short "
        "parts, a part count or size that differs from its <id>.json).",
    )
    _add_location_options(p, allow_dir=True, has_backup_id=False)
    p.add_argument("-o", "--output", choices=("text", "json", "yaml"), default="text",
                   help="text (default), json or yaml")
    p.add_argument("--json", dest="output", action="store_const", const="json",
                   help="the same as -o json")
    p.set_defaults(func=_cmd_list)

    p = commands.add_parser(
        "fetch", help="download a backup's parts (resumable)",
        description="Download the encrypted parts of a backup (the latest unless --backup-id) "
        "into a directory, in parallel range requests; parts already there with the right size "
        "are kept, so an interrupted fetch continues. Nothing is decrypted.",
    )
    _add_location_options(p, allow_dir=False)
    p.add_argument("--backup-id", help="<guid>-<epoch-ms>; default: the latest backup")
    p.add_argument("--dir", type=Path, required=True, help="directory to download into")
    p.add_argument("--concurrency", type=int, default=8, help="parallel range requests (8)")
    _add_progress_options(p)
    p.set_defaults(func=_cmd_fetch)

    p = commands.add_parser(
        "decrypt",
        help="decrypt + gunzip a backup (from the store or a directory) to a dump file",
        description="Stream a backup's parts in natural order through AES-256-CBC decryption "
        "(OpenSSL enc format; the key from --key-file, --key-env or a prompt, never the "
        "command line) and gunzip into a pg_dumpall script, in constant memory; the gzip "
        "checksum is verified before the dump is reported complete.",
    )
    _add_location_options(p, allow_dir=True)
    p.add_argument("--backup-id", help="<guid>-<epoch-ms>; default: the latest backup")
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        help="dump file to write, '-' for stdout (default: ./<backup-id>.dump)",
    )
    keys = p.add_argument_group("the encryption key (never on the command line)")
    keys.add_argument("--key-file", metavar="PATH", help="file whose first line is the key")
    keys.add_argument(
        "--key-env",
        metavar="NAME",
        default=DEFAULT_KEY_ENV,
        help=f"environment variable holding the key (default {DEFAULT_KEY_ENV}); "
        "without either, the key is prompted for",
    )
    p.add_argument(
        "--digest",
        choices=[d.value for d in Digest],
        default=Digest.AUTO.value,
        help="EVP_BytesToKey digest of `openssl enc -md` (default auto: md5, then sha256)",
    )
    p.add_argument(
        "--sha256",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="print the sha256 of the dump (computed while writing)",
    )
    _add_progress_options(p)
    p.set_defaults(func=_cmd_decrypt)


# ------------------------------------------------------------------ entry point

# Each group adds its sub-parsers; `recover` and `demo` register here the same way.
GROUPS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    _register_backups,
    register_recover,
    register_cleanup,
    register_status,
    register_demo,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgrecovery",
        description="PostgreSQL disaster recovery for a9s-pg / Dingo clusters on BOSH VMs.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv)")
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {importlib.metadata.version('pgrecovery')}")
    groups = parser.add_subparsers(dest="group", required=True, metavar="GROUP")
    for register in GROUPS:
        register(groups)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    func = args.func
    try:
        result = func(args)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
        return int(result)
    except KeyboardInterrupt:
        print("pgrecovery: interrupted", file=sys.stderr)
        return 130
    except RecoveryError as exc:
        text = str(exc) if args.group != "backups" else in_cli_words(str(exc))
        print(f"pgrecovery: {exc.reason}: {text}", file=sys.stderr)
        return EX_TEMPFAIL if exc.retryable else 1


# The backups layer words its advice for the manifest (`spec.…`); a `pgrecovery backups` user
# typed flags and environment variables instead. Longest first: one field may prefix another.
_SPEC_TO_CLI = sorted(
    {
        "spec.source.backupGuid": "--guid",
        "spec.source.backupId": "--backup-id",
        "spec.source.encryption.keySecretRef": "--key-file / --key-env",
        "spec.source.encryption.digest": "--digest",
        "spec.source.s3.bucket": "--s3-bucket",
        "spec.source.s3.prefix": "--prefix",
        "spec.source.s3.endpoint": "--endpoint-url",
        "spec.source.azure.container": "--azure-container",
        "spec.source.azure.accountUrl": "--account-url",
        "spec.source.s3.credentialsSecretRef": "the AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                                               "variables",
        "spec.source.azure.credentialsSecretRef": "AZURE_STORAGE_KEY, AZURE_STORAGE_SAS_TOKEN "
                                                  "or AZURE_STORAGE_CONNECTION_STRING",
        "spec.source.*.credentialsSecretRef": "the store's credential variables",
    }.items(),
    key=lambda kv: -len(kv[0]),
)


def in_cli_words(text: str) -> str:
    """A message of the backups layer with the spec fields it names replaced by the flags."""
    for field, flag in _SPEC_TO_CLI:
        text = text.replace(field, flag)
    return text


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
