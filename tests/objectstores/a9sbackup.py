"""Make a9s-pg logical backups exactly as the a9s Backup Manager does, with the real tools.

Why this module exists: tests must prove that pgrecovery reads what the Backup Manager
writes, so the backups are made by the same programs: `gzip`, `openssl enc -aes256 -md md5`
(key from a file, never on a command line), `split`, then uploaded with boto3 or
azure-storage-blob. `manual_decrypt` runs the runbook's own pipeline
(`cat $(ls -1v …) | openssl enc -d … | gunzip`) to get the reference output.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class MadeBackup:
    backup_id: str
    files: tuple[Path, ...]
    """Part files `<id>-<n>` in natural order (or the single blob `<id>`)."""
    metadata: Path | None


def encrypt(plain: Path, out: Path, key_file: Path, *, md: str = "md5") -> None:
    """`gzip -c < plain | openssl enc -aes256 -md MD -pass file:KEY > out`."""
    with plain.open("rb") as src, out.open("wb") as dst:
        gz = subprocess.Popen(["gzip", "-c"], stdin=src, stdout=subprocess.PIPE)
        enc = subprocess.run(
            ["openssl", "enc", "-aes256", "-md", md, "-pass", f"file:{key_file}"],
            stdin=gz.stdout,
            stdout=dst,
            stderr=subprocess.PIPE,
            check=False,
        )
        assert gz.stdout is not None
        gz.stdout.close()
        if gz.wait() != 0 or enc.returncode != 0:
            raise RuntimeError(f"gzip|openssl failed: {enc.stderr.decode(errors='replace')}")


def make_backup(
    plain: Path,
    workdir: Path,
    backup_id: str,
    key_file: Path,
    *,
    part_size: int | None,
    md: str = "md5",
    index_start: int = 0,
    metadata: bool = True,
) -> MadeBackup:
    """Encrypt `plain` into `workdir`; split into `<id>-<n>` parts unless `part_size` is None."""
    workdir.mkdir(parents=True, exist_ok=True)
    whole = workdir / f"{backup_id}.enc"
    encrypt(plain, whole, key_file, md=md)
    if part_size is None:
        single = workdir / backup_id
        whole.rename(single)
        files: list[Path] = [single]
    else:
        staging = workdir / f"{backup_id}.split"
        staging.mkdir()
        subprocess.run(
            ["split", "-b", str(part_size), "-d", "-a", "5", str(whole), str(staging / "x")],
            check=True,
        )
        whole.unlink()
        files = []
        for produced in sorted(staging.iterdir()):
            index = int(produced.name[1:]) + index_start
            target = workdir / f"{backup_id}-{index}"
            produced.rename(target)
            files.append(target)
        staging.rmdir()
    meta = None
    if metadata:
        meta = workdir / f"{backup_id}.json"
        meta.write_text(
            json.dumps({"id": backup_id, "parts": len(files), "encrypted": True, "status": "done"})
        )
    return MadeBackup(backup_id, tuple(files), meta)


def manual_decrypt(
    files: list[Path] | tuple[Path, ...], key_file: Path, out: Path, *, md: str = "md5"
) -> None:
    """The runbook: `cat $(ls -1v parts) | openssl enc -d -aes256 -md md5 -pass file:K | gunzip`."""
    directory = files[0].parent
    names = " ".join(shlex.quote(f.name) for f in files)
    script = (
        f"cd {shlex.quote(str(directory))} && cat $(ls -1v {names}) | "
        f"openssl enc -d -aes256 -md {md} -pass file:{shlex.quote(str(key_file))} | "
        f"gunzip -c > {shlex.quote(str(out))}"
    )
    subprocess.run(["bash", "-o", "pipefail", "-c", script], check=True, capture_output=True)


def upload_s3(client: Any, bucket: str, backup: MadeBackup, *, prefix: str = "") -> list[str]:
    keys = []
    for path in [*backup.files, *([backup.metadata] if backup.metadata else [])]:
        key = prefix + path.name
        client.upload_file(str(path), bucket, key)
        keys.append(key)
    return keys


def upload_azure(container_client: Any, backup: MadeBackup, *, prefix: str = "") -> list[str]:
    names = []
    for path in backup.files:
        with path.open("rb") as f:
            container_client.upload_blob(prefix + path.name, f, overwrite=True)
        names.append(prefix + path.name)
    return names
