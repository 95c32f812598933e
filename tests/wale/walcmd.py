#!/usr/bin/python3
"""`wal-push` / `wal-fetch` of the WAL-E test world: PostgreSQL's archive_command and
restore_command for an S3 archive in WAL-E's layout (`<prefix>wal_005/<WAL file>.lzo`).

Why this exists: WAL-E itself cannot run against PostgreSQL 15 (and is not installable here),
but the recovery code must be tested against archives a real PostgreSQL produced. This program
does what `wal-e wal-push` / `wal-e wal-fetch` do with the same object names and the same
compression (the `lzop` binary's file format, as WAL-E pipes through `lzop --stdout`).

Why stdlib only: inside a simulated VM the script runs with the host's read-only /usr, where
`/usr/bin/python3` has no boto3 (the test interpreter with boto3 lives under /root, which every
VM hides). So S3 requests are signed here (AWS Signature V4; SeaweedFS checks it).

Usage (PostgreSQL runs it with the data directory as working directory):

    archive_command = '/usr/bin/python3 walcmd.py --envdir DIR push %p %f'
    restore_command = '/usr/bin/python3 walcmd.py --envdir DIR fetch %f %p'

Configuration comes from the environment or an envdir (one file per variable, first line is
the value, as daemontools' `envdir` used by WAL-E deployments), never from the command line:
WALE_S3_PREFIX (`s3://bucket/backups/<guid>/wal/`), WALE_S3_ENDPOINT (WAL-E's
`http+path://host:port`, or a plain `http://host:port`), AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_REGION (default us-east-1).

Exit status: 0 done; 1 failed (PostgreSQL retries a push later; a failed fetch means "not
in the archive"); 2 usage or configuration error. A push of a segment that is already archived
with the same content succeeds (idempotent); with different content it fails, as the
PostgreSQL documentation asks of an archive_command.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import re
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

WAL_DIR = "wal_005"
LZOP = "/usr/bin/lzop"
# One request must not hold the archiver forever when the store is unreachable (a network
# cut): PostgreSQL retries a failed archive_command about every minute anyway.
TIMEOUT_S = 20.0
# WAL file names PostgreSQL hands to archive/restore commands: segments, partial segments,
# backup history files and timeline history files.
WAL_NAME_RE = re.compile(
    r"^(?:[0-9A-F]{24}(?:\.partial|\.[0-9A-F]{8}\.backup)?|[0-9A-F]{8}\.history)$"
)
SHA_META = "x-amz-meta-wal-sha256"
EMPTY_SHA = hashlib.sha256(b"").hexdigest()


class UsageError(Exception):
    """Bad arguments or configuration: exit 2."""


class StoreError(Exception):
    """The object store refused or could not be reached: exit 1."""


@dataclass(frozen=True)
class Config:
    endpoint: str
    """`http://host:port` (path-style addressing)."""
    bucket: str
    prefix: str
    """Key prefix ending in `/`, e.g. `backups/<guid>/wal/`."""
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    region: str = "us-east-1"

    def wal_key(self, name: str) -> str:
        return f"{self.prefix}{WAL_DIR}/{name}.lzo"


def read_envdir(directory: Path) -> dict[str, str]:
    """daemontools envdir semantics: file name = variable, first line = value."""
    values = {}
    for entry in sorted(directory.iterdir()):
        if entry.is_file() and not entry.name.startswith("."):
            values[entry.name] = entry.read_text().split("\n", 1)[0].rstrip()
    return values


def load_config(env: dict[str, str]) -> Config:
    prefix_url = env.get("WALE_S3_PREFIX", "")
    parsed = urllib.parse.urlsplit(prefix_url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise UsageError("WALE_S3_PREFIX must look like s3://bucket/backups/<guid>/wal/")
    prefix = parsed.path.strip("/")
    prefix = prefix + "/" if prefix else ""
    endpoint = env.get("WALE_S3_ENDPOINT", "")
    # WAL-E spells the endpoint `<scheme>+<calling format>://host:port`; only path-style
    # addressing is supported here (test servers have no per-bucket DNS names).
    match = re.match(r"^(https?)(?:\+path)?://([^/]+)/?$", endpoint)
    if not match:
        raise UsageError("WALE_S3_ENDPOINT must look like http+path://host:port")
    access, secret = env.get("AWS_ACCESS_KEY_ID", ""), env.get("AWS_SECRET_ACCESS_KEY", "")
    if not access or not secret:
        raise UsageError("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are required")
    return Config(
        endpoint=f"{match.group(1)}://{match.group(2)}",
        bucket=parsed.netloc,
        prefix=prefix,
        access_key=access,
        secret_key=secret,
        region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
    )


# ---------------------------------------------------------------- S3 with Signature V4


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def signed_request(
    config: Config,
    method: str,
    key: str,
    *,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    now: dt.datetime | None = None,
) -> urllib.request.Request:
    """A path-style S3 request signed with AWS Signature Version 4 (all `x-amz-*` headers
    and `host` signed; payload hash sent as `x-amz-content-sha256`)."""
    now = now or dt.datetime.now(dt.UTC)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = now.strftime("%Y%m%d")
    path = "/" + urllib.parse.quote(f"{config.bucket}/{key}", safe="/-_.~")
    host = urllib.parse.urlsplit(config.endpoint).netloc
    payload_hash = hashlib.sha256(body).hexdigest() if body else EMPTY_SHA
    all_headers = {
        "host": host,
        "x-amz-content-sha256": payload_hash,
        "x-amz-date": amz_date,
        **{k.lower(): v.strip() for k, v in (headers or {}).items()},
    }
    signed = sorted(k for k in all_headers if k == "host" or k.startswith("x-amz-"))
    canonical = "\n".join(
        [
            method,
            path,
            "",
            "".join(f"{k}:{all_headers[k]}\n" for k in signed),
            ";".join(signed),
            payload_hash,
        ]
    )
    scope = f"{day}/{config.region}/s3/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    signing_key = _hmac(
        _hmac(_hmac(_hmac(("AWS4" + config.secret_key).encode(), day), config.region), "s3"),
        "aws4_request",
    )
    signature = hmac.new(signing_key, to_sign.encode(), hashlib.sha256).hexdigest()
    all_headers["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={config.access_key}/{scope}, "
        f"SignedHeaders={';'.join(signed)}, Signature={signature}"
    )
    del all_headers["host"]  # urllib sets it from the URL
    return urllib.request.Request(  # noqa: S310 - the endpoint is http(s) by load_config
        config.endpoint + path, data=body or None, headers=all_headers, method=method
    )


def _send(request: urllib.request.Request) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:  # noqa: S310
            return (
                response.status,
                {k.lower(): v for k, v in response.headers.items()},
                (response.read()),
            )
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        raise StoreError(f"cannot reach {request.full_url.split('?')[0]}: {exc}") from None


def head(config: Config, key: str) -> dict[str, str] | None:
    status, headers, _ = _send(signed_request(config, "HEAD", key))
    if status == 404:
        return None
    if status != 200:
        raise StoreError(f"HEAD {key}: HTTP {status}")
    return headers


def put(config: Config, key: str, body: bytes, metadata: dict[str, str]) -> None:
    headers = {f"x-amz-meta-{k}": v for k, v in metadata.items()}
    # Without it urllib sends application/x-www-form-urlencoded, and moto's server (Werkzeug)
    # then reads the body as a form and stores an empty object.
    headers["content-type"] = "application/octet-stream"
    status, _, text = _send(signed_request(config, "PUT", key, body=body, headers=headers))
    if status != 200:
        raise StoreError(f"PUT {key}: HTTP {status} {text[:300]!r}")


def get(config: Config, key: str) -> bytes | None:
    status, _, body = _send(signed_request(config, "GET", key))
    if status == 404:
        return None
    if status != 200:
        raise StoreError(f"GET {key}: HTTP {status} {body[:300]!r}")
    return body


# ---------------------------------------------------------------- push / fetch


def lzop_compress(raw: bytes) -> bytes:
    # Exactly WAL-E's filter: `lzop --stdout` on a pipe (header without a file name).
    proc = subprocess.run([LZOP, "--stdout"], input=raw, capture_output=True, check=False)
    if proc.returncode != 0:
        raise StoreError(f"lzop failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def push(config: Config, path: str, name: str) -> str:
    """Archive WAL file `path` as `name`; returns what happened (for the log line)."""
    raw = Path(path).read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    key = config.wal_key(name)
    existing = head(config, key)
    if existing is not None:
        if existing.get(SHA_META) == digest:
            return f"already archived: s3://{config.bucket}/{key}"
        raise StoreError(
            f"s3://{config.bucket}/{key} exists with different content; refusing to overwrite "
            "(is another cluster archiving into this prefix?)"
        )
    put(config, key, lzop_compress(raw), {"wal-sha256": digest})
    return f'uploaded "{path}" to "s3://{config.bucket}/{key}"'


def fetch(config: Config, name: str, destination: str) -> str:
    key = config.wal_key(name)
    body = get(config, key)
    if body is None:
        raise StoreError(f"s3://{config.bucket}/{key} is not in the archive")
    target = Path(destination)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            proc = subprocess.run(
                [LZOP, "-d", "--stdout", "-"], input=body, stdout=out, stderr=subprocess.PIPE,
                check=False,
            )  # fmt: skip
        if proc.returncode != 0:
            raise StoreError(
                f"lzop -d of s3://{config.bucket}/{key} failed: "
                f"{proc.stderr.decode(errors='replace').strip()}"
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return f'fetched "s3://{config.bucket}/{key}" to "{destination}"'


def main(argv: list[str]) -> int:
    args = list(argv)
    env = dict(os.environ)
    try:
        if args[:1] == ["--envdir"]:
            if len(args) < 2:
                raise UsageError("--envdir needs a directory")
            env.update(read_envdir(Path(args[1])))
            args = args[2:]
        if len(args) != 3 or args[0] not in ("push", "fetch"):
            raise UsageError("usage: walcmd.py [--envdir DIR] push %p %f | fetch %f %p")
        command = args[0]
        name = args[2] if command == "push" else args[1]
        if not WAL_NAME_RE.match(name):
            raise UsageError(f"not a WAL file name: {name!r}")
        config = load_config(env)
        message = push(config, args[1], name) if command == "push" else fetch(config, name, args[2])
    except UsageError as exc:
        print(f"walcmd: {exc}", file=sys.stderr)
        return 2
    except (StoreError, OSError) as exc:
        print(f"walcmd: {exc}", file=sys.stderr)
        return 1
    print(f"walcmd: {message}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
