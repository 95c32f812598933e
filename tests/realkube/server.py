"""Start, use and stop a real kube-apiserver + etcd (see the package docstring).

`RealKubeAPI` offers what the emulator's `KubeAPI` offers, so e2e tests and the kopf harness
(`tests.kubeapi.harness.KopfProcess`) can switch between them:

- `kubeconfig` (admin: client certificate in group system:masters), `user_kubeconfig(user,
  namespace)` (a client certificate for `user`, also in system:masters, so a harness that
  gives each operator its own user keeps working), `serviceaccount_kubeconfig(namespace,
  name)` (a real ServiceAccount token from the TokenRequest API: RBAC applies);
- `request()` a raw call as admin, `create()`, `create_namespace()`, `install_crd()`;
- `records()` / `mark()`: every request the server received, read from its audit log (user,
  verb, group, resource, subresource, namespace, name, response code), as `RequestRecord`s.

What was learned: without kube-controller-manager nothing deletes a Namespace's content (it
stays Terminating) and no `default` ServiceAccount appears; neither matters to the tests, which
create their ServiceAccounts and leave namespaces to die with the session's etcd.
"""

from __future__ import annotations

import base64
import ctypes
import dataclasses
import datetime
import hashlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from tests.kubeapi.server import RequestRecord

REPO_ROOT = Path(__file__).resolve().parents[2]
PIN_DIR = REPO_ROOT / ".ci" / "kube"
CACHE_ROOT = Path(os.environ.get("PGRECOVERY_KUBE_CACHE", "/var/cache/pgrecovery-kube"))
ISSUER = "https://kubernetes.default.svc.cluster.local"
READY_TIMEOUT = 120.0  # a cold kube-apiserver on a loaded 2-CPU machine: ~10-30 s seen


class KubeStartError(RuntimeError):
    """The binaries are missing or did not start; the message names the log to read."""


def _pinned(module: str) -> str:
    for line in (PIN_DIR / "go.mod").read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == module and parts[1].startswith("v"):
            return parts[1]
    raise KubeStartError(f"{module} is not pinned in {PIN_DIR / 'go.mod'}")


def bin_dir() -> Path:
    """Where `.ci/build-kube.sh` puts the binaries for the pin in the repo (same key)."""
    override = os.environ.get("PGRECOVERY_KUBE_BIN_DIR")
    if override:
        return Path(override)
    pin = b"".join((PIN_DIR / name).read_bytes() for name in ("go.mod", "go.sum"))
    pin += (PIN_DIR.parent / "build-kube.sh").read_bytes()
    key = (f"kube-{_pinned('k8s.io/kubernetes')}-etcd-{_pinned('go.etcd.io/etcd/server/v3')}"
           f"-{hashlib.sha256(pin).hexdigest()[:12]}")
    return CACHE_ROOT / key / "bin"


def missing_binaries() -> str | None:
    """None when both binaries are there, else a sentence saying what is missing."""
    directory = bin_dir()
    missing = [name for name in ("kube-apiserver", "etcd")
               if not os.access(directory / name, os.X_OK)]
    if not missing:
        return None
    return (f"{' and '.join(missing)} not built in {directory}: run bash .ci/build-kube.sh "
            "(or bash .ci/setup)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------------- PKI


def _pem_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class CertificateAuthority:
    """A throw-away CA for the server's TLS certificate and the clients' certificates."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pgrecovery-test-ca")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str, *, organizations: tuple[str, ...] = (),
              server: bool = False) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for a client (CN = user, O = groups) or the server."""
        key = ec.generate_private_key(ec.SECP256R1())
        attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        attributes += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in organizations]
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder().subject_name(x509.Name(attributes))
            .issuer_name(self.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage(
                [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH if server
                 else x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.DNSName("kubernetes"),
                x509.DNSName("kubernetes.default.svc"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
            ]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    # RequestReceived adds nothing to ResponseComplete; a watch is logged when it starts
    # (ResponseStarted), which is how a harness knows that an operator is watching.
    "omitStages": ["RequestReceived"],
    "rules": [{"level": "Metadata"}],
}


class RealKubeAPI:
    """etcd + kube-apiserver running in `directory` (see the module docstring)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.url = ""
        self.etcd: subprocess.Popen[bytes] | None = None
        self.apiserver: subprocess.Popen[bytes] | None = None
        self.ca = CertificateAuthority()
        self.kubeconfig = directory / "kubeconfig-admin"
        self.etcd_log = directory / "etcd.log"
        self.apiserver_log = directory / "kube-apiserver.log"
        self.audit_log = directory / "audit.log"
        self.version = ""
        self._user_configs: dict[tuple[str, str], Path] = {}
        self._records: list[RequestRecord] = []
        self._record_index: dict[str, int] = {}
        self._audit_offset = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        problem = missing_binaries()
        if problem:
            raise KubeStartError(problem)
        binaries = bin_dir()
        self.directory.mkdir(parents=True, exist_ok=True)
        pki = self.directory / "pki"
        pki.mkdir(exist_ok=True)
        (pki / "ca.crt").write_bytes(self.ca.pem)
        server_cert, server_key = self.ca.issue("kube-apiserver", server=True)
        (pki / "apiserver.crt").write_bytes(server_cert)
        (pki / "apiserver.key").write_bytes(server_key)
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (pki / "sa.key").write_bytes(_pem_key(sa_key))
        (pki / "sa.pub").write_bytes(sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        admin_cert, admin_key = self.ca.issue("admin", organizations=("system:masters",))
        (pki / "admin.crt").write_bytes(admin_cert)
        (pki / "admin.key").write_bytes(admin_key)
        (self.directory / "audit-policy.yaml").write_text(yaml.safe_dump(AUDIT_POLICY))

        etcd_port, peer_port, secure_port = free_port(), free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        self.etcd = self._spawn(self.etcd_log, [
            str(binaries / "etcd"), "--name", "test",
            "--data-dir", str(self.directory / "etcd-data"),
            "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
            "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-cluster", f"test=http://127.0.0.1:{peer_port}",
            # a test server's data dies with the session: no fsync (the tests' I/O is shared)
            "--unsafe-no-fsync", "--log-level", "warn",
        ])
        self._wait("etcd", self.etcd, self.etcd_log,
                   lambda: _http_ok(f"{etcd_url}/health", None, b'"health":"true"'))

        self.url = f"https://127.0.0.1:{secure_port}"
        self.apiserver = self._spawn(self.apiserver_log, [
            str(binaries / "kube-apiserver"),
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={secure_port}",
            f"--cert-dir={pki}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--service-account-issuer={ISSUER}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--authorization-mode=RBAC",
            "--allow-privileged=true",
            f"--audit-policy-file={self.directory / 'audit-policy.yaml'}",
            f"--audit-log-path={self.audit_log}",
            "--audit-log-format=json",
            "--profiling=false",
        ])
        self._wait("kube-apiserver", self.apiserver, self.apiserver_log,
                   lambda: _http_ok(f"{self.url}/readyz", self._ssl_context(), b"ok"))
        self.kubeconfig = self._write_kubeconfig(
            self.directory / "kubeconfig-admin", "admin", "default",
            {"client-certificate-data": _b64(admin_cert), "client-key-data": _b64(admin_key)})
        _, version = self.request("GET", "/version")
        self.version = str(version.get("gitVersion", "")) if isinstance(version, dict) else ""

    def stop(self) -> None:
        for process in (self.apiserver, self.etcd):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def _spawn(self, log: Path, command: list[str]) -> subprocess.Popen[bytes]:
        # Own session: a Ctrl-C in the terminal reaches pytest, whose teardown stops them in
        # order; killed when pytest dies without a teardown (SIGKILL), so nothing is orphaned.
        with log.open("ab") as out:
            out.write(f"===== {' '.join(command)}\n".encode())
            out.flush()
            return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=_die_with_parent)  # noqa: PLW1509 - see _PRCTL

    def _wait(self, what: str, process: subprocess.Popen[bytes], log: Path,
              ready: Any) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not ready():
            if process.poll() is not None:
                self.stop()
                raise KubeStartError(f"{what} exited with {process.returncode} (log: {log})")
            if time.monotonic() > deadline:
                self.stop()
                raise KubeStartError(f"{what} not ready after {READY_TIMEOUT:.0f} s (log: {log})")
            time.sleep(0.2)

    # ------------------------------------------------------------------ identities

    def _write_kubeconfig(self, path: Path, user: str, namespace: str,
                          credentials: Mapping[str, str]) -> Path:
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {
                "server": self.url, "certificate-authority-data": _b64(self.ca.pem)}}],
            "users": [{"name": user, "user": dict(credentials)}],
            "contexts": [{"name": "test", "context": {
                "cluster": "test", "user": user, "namespace": namespace}}],
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        path.chmod(0o600)
        return path

    def user_kubeconfig(self, user: str, namespace: str = "default") -> Path:
        """A kubeconfig for `user` (client certificate, group system:masters: not subject to
        RBAC). The audit log records its requests under `user`."""
        if user == "admin" and namespace == "default":
            return self.kubeconfig
        key = (user, namespace)
        if key not in self._user_configs:
            cert, private = self.ca.issue(user, organizations=("system:masters",))
            self._user_configs[key] = self._write_kubeconfig(
                self.directory / "users" / f"kubeconfig-{user}-{namespace}", user, namespace,
                {"client-certificate-data": _b64(cert), "client-key-data": _b64(private)})
        return self._user_configs[key]

    def serviceaccount_token(self, namespace: str, name: str, *, seconds: int = 7200) -> str:
        """A bound token of a ServiceAccount (TokenRequest API), as the kubelet mounts one."""
        status, answer = self.request(
            "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
             "spec": {"expirationSeconds": seconds}})
        if status != 201:
            raise KubeStartError(f"TokenRequest for {namespace}/{name} failed: {status} {answer}")
        return str(answer["status"]["token"])

    def serviceaccount_kubeconfig(self, namespace: str, name: str) -> Path:
        """A kubeconfig that authenticates as the ServiceAccount: RBAC decides what it may do.
        Its requests are recorded as `system:serviceaccount:<namespace>:<name>`."""
        token = self.serviceaccount_token(namespace, name)
        return self._write_kubeconfig(
            self.directory / "users" / f"kubeconfig-sa-{namespace}-{name}",
            f"system:serviceaccount:{namespace}:{name}", namespace, {"token": token})

    # ------------------------------------------------------------------ raw API

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.directory / "pki" / "ca.crt"))
        context.load_cert_chain(self.directory / "pki" / "admin.crt",
                                self.directory / "pki" / "admin.key")
        return context

    def request(self, method: str, path: str, body: Any = None, *,
                content_type: str = "application/json", user: str = "admin",
                accept: str = "application/json") -> tuple[int, Any]:
        """A raw call as admin (status code, decoded JSON body); `user` must be admin here
        (kept for the emulator's signature): other identities go through kubeconfigs."""
        if user != "admin":
            raise ValueError("RealKubeAPI.request speaks as admin only; use a kubeconfig")
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={  # noqa: S310
            "Content-Type": content_type, "Accept": accept})
        try:
            with urllib.request.urlopen(req, timeout=30, context=self._ssl_context()) as resp:  # noqa: S310
                payload = resp.read()
                status = resp.status
        except urllib.error.HTTPError as e:
            payload = e.read()
            status = e.code
        try:
            decoded = json.loads(payload) if payload else None
        except ValueError:
            decoded = payload.decode(errors="replace")
        return status, decoded

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """POST an object given as a dict; raises on any answer but 201."""
        api_version = str(obj["apiVersion"])
        namespace = (obj.get("metadata") or {}).get("namespace")
        base = f"/apis/{api_version}" if "/" in api_version else f"/api/{api_version}"
        status, listing = self.request("GET", base)
        plural = next((r["name"] for r in (listing or {}).get("resources", [])
                       if r["kind"] == obj["kind"] and "/" not in r["name"]), None)
        if status != 200 or plural is None:
            raise AssertionError(f"the server does not serve {obj['kind']} in {api_version}")
        scope = f"/namespaces/{namespace}" if namespace else ""
        status, created = self.request("POST", f"{base}{scope}/{plural}", dict(obj))
        if status != 201:
            raise AssertionError(f"creating {obj['kind']} failed with {status}: {created}")
        return dict(created)

    def create_namespace(self, name: str) -> dict[str, Any]:
        return self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    def install_crd(self, path: Path) -> dict[str, Any]:
        """Create (or leave as is) the CRD in `path` and wait until it is Established."""
        crd = yaml.safe_load(path.read_text(encoding="utf-8"))
        name = crd["metadata"]["name"]
        status, found = self.request(
            "GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
        if status == 404:
            found = self.create(crd)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status, found = self.request(
                "GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
            # a CRD just created has "conditions": null until its controllers have looked
            conditions = {c["type"]: c["status"]
                          for c in ((found or {}).get("status") or {}).get("conditions") or []}
            if conditions.get("Established") == "True" and self._lists(found):
                return dict(found)
            time.sleep(0.2)
        raise AssertionError(f"CRD {name} not Established and served after 30 s: {found}")

    def _lists(self, crd: Mapping[str, Any]) -> bool:
        """Established is not enough: until the resource's watch cache is built the server
        answers a list with 429 "storage is (re)initializing" (kopf retries, and logs an
        ERROR). Served means a list from the cache (resourceVersion=0) succeeds."""
        version = next(v["name"] for v in crd["spec"]["versions"] if v.get("served"))
        path = f"/apis/{crd['spec']['group']}/{version}/{crd['spec']['names']['plural']}"
        status, _ = self.request("GET", f"{path}?resourceVersion=0&limit=1")
        return status == 200

    # ------------------------------------------------------------------ request log

    def _read_audit(self) -> None:
        if not self.audit_log.exists():
            return
        with self.audit_log.open("rb") as log:
            log.seek(self._audit_offset)
            chunk = log.read()
        end = chunk.rfind(b"\n") + 1  # a line still being written is read next time
        self._audit_offset += end
        for line in chunk[:end].splitlines():
            event = json.loads(line)
            audit_id = event["auditID"]
            code = int((event.get("responseStatus") or {}).get("code", 0))
            if audit_id in self._record_index:
                if event.get("stage") == "ResponseComplete":
                    index = self._record_index[audit_id]
                    self._records[index] = _replace_status(self._records[index], code)
                continue
            self._record_index[audit_id] = len(self._records)
            self._records.append(_record(event, code))

    def records(self, *, since: int = 0, **match: Any) -> list[RequestRecord]:
        """Requests received (from index `since`), filtered by RequestRecord fields."""
        self._read_audit()
        return [r for r in self._records[since:]
                if all(getattr(r, key) == value for key, value in match.items())]

    def mark(self) -> int:
        """An index for `records(since=…)`: only what arrives after this call."""
        self._read_audit()
        return len(self._records)


def _replace_status(record: RequestRecord, code: int) -> RequestRecord:
    return dataclasses.replace(record, status=code)


def _record(event: dict[str, Any], code: int) -> RequestRecord:
    ref = event.get("objectRef") or {}
    uri = urllib.parse.urlsplit(event.get("requestURI", ""))
    user = (event.get("impersonatedUser") or event.get("user") or {}).get("username", "")
    resource = ref.get("resource")
    return RequestRecord(
        verb=event.get("verb", ""),
        group=ref.get("apiGroup", "") if resource else None,
        version=ref.get("apiVersion") if resource else None,
        resource=resource,
        subresource=ref.get("subresource"),
        namespace=ref.get("namespace"),
        name=ref.get("name"),
        path=uri.path,
        params=dict(urllib.parse.parse_qsl(uri.query)),
        user=user,
        user_agent=event.get("userAgent", ""),
        # a watch is recorded when it starts (0 = still streaming, as in the emulator)
        status=0 if event.get("stage") == "ResponseStarted" else code,
    )


# Looked up once in the parent: between fork and exec the child only calls it (no dlopen, which
# could wait forever on a lock another thread of pytest held at the fork).
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the process that started it exits (a
    SIGTERMed kube-apiserver whose etcd is gone too was seen to hang in its shutdown)."""
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _http_ok(url: str, context: ssl.SSLContext | None, expect: bytes) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as resp:  # noqa: S310
            return resp.status == 200 and expect in resp.read()
    except (OSError, ValueError):
        return False
