"""A BOSH director for tests: the subset of the director API that `bosh instances`, `bosh ssh`
and pgrecovery use, written from the public behaviour of the bosh CLI (cloudfoundry/bosh-cli
`director/{info,deployments,instances,vms,ssh,task_client_request}.go`, `uaa/`) and of the BOSH
agent (`agent/action/ssh.go`, `platform/linux_platform.go`), checked with the real bosh CLI
(tests/boshdirector/test_bosh_cli.py).

What is real: HTTPS with its own CA; a UAA token endpoint (client credentials, HTTP basic
client authentication, JWT-shaped tokens with `exp` and `scope`) on its own port, or the
director's basic auth; tasks with states (`queued` → `processing` → `done` | `error`), their
result and event output, `Range` reads; and the effects: `ssh setup` creates the user on each
targeted simulated VM as the agent does (`useradd -m -b /var/vcap/bosh_ssh`, groups
vcap,bosh_sudoers,bosh_sshers, `authorized_keys`) and returns the VM's
`/etc/ssh/ssh_host_rsa_key.pub` as `host_public_key`; `cleanup` deletes, like the agent, only
users whose name starts with `bosh_` and matches `user_regex` (`userdel -rf`). Instances come
from the running simulated cluster.

Faults for tests are attributes (`ssh_task_error`, `host_key_override`, `hold_tasks`,
`instance_overrides`), each named for what it does.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import re
import secrets
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from .tls import Pki, make_pki

ADMIN_SCOPE = "bosh.admin"
READ_SCOPE = "bosh.read"


class VM(Protocol):
    """What the emulator needs of a simulated VM (tests.simcluster.cluster.SimVM has it)."""

    name: str
    index: int
    address: str

    @property
    def running(self) -> bool: ...

    def agent_state(self) -> str: ...

    def monit_status(self) -> dict[str, str]: ...

    def run(
        self,
        command: str | Sequence[str],
        *,
        check: bool = True,
        input: str | None = None,
        timeout: float = 120.0,
        env: dict[str, str] | None = None,
    ) -> Any: ...


@dataclass
class Client:
    """A UAA client (or, with basic auth, a director user)."""

    secret: str
    scopes: tuple[str, ...] = (ADMIN_SCOPE,)


@dataclass
class Task:
    id: int
    description: str
    deployment: str
    user: str
    state: str = "queued"
    result: str = ""
    """Output of type `result` (what /tasks/<id>/output?type=result returns)."""
    events: list[str] = field(default_factory=list)
    started_at: int = 0
    timestamp: int = field(default_factory=lambda: int(time.time()))
    error: str = ""

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "description": self.description,
            "timestamp": self.timestamp,
            "started_at": self.started_at,
            # As the director: a failed task's `result` is its error message.
            "result": self.error if self.state == "error" else "",
            "user": self.user,
            "deployment": self.deployment,
            "context_id": "",
        }


class TaskError(Exception):
    """A task that ends in state `error` with this message."""


# The agent's `ssh setup`, as a script run as root in the VM (values arrive in the environment,
# never spliced into the text).
_SETUP = r"""
set -eu
mkdir -p /var/vcap/bosh_ssh
id -u "$SSH_USER" >/dev/null 2>&1 || useradd -m -b /var/vcap/bosh_ssh -s /bin/bash "$SSH_USER"
chmod 700 "/var/vcap/bosh_ssh/$SSH_USER"
usermod -G vcap,bosh_sudoers,bosh_sshers "$SSH_USER"
# `*`, not useradd's `!`: sshd without PAM refuses locked accounts even for key logins.
usermod -p '*' "$SSH_USER"
install -d -m 0700 -o "$SSH_USER" "/var/vcap/bosh_ssh/$SSH_USER/.ssh"
printf '%s' "$SSH_PUBLIC_KEY" >"/var/vcap/bosh_ssh/$SSH_USER/.ssh/authorized_keys"
chown "$SSH_USER" "/var/vcap/bosh_ssh/$SSH_USER/.ssh/authorized_keys"
chmod 0600 "/var/vcap/bosh_ssh/$SSH_USER/.ssh/authorized_keys"
cat /etc/ssh/ssh_host_rsa_key.pub
"""

# The agent's `ssh cleanup`: users named bosh_* that match the regex (the agent's rule; a user
# named otherwise is never removed by cleanup).
_CLEANUP = r"""
set -u
cut -d: -f1 /etc/passwd | while read -r u; do
    case "$u" in bosh_*) ;; *) continue ;; esac
    printf '%s\n' "$u" | grep -Eq -- "$USER_REGEX" || continue
    pkill -KILL -u "$u" 2>/dev/null
    userdel -rf "$u" 2>/dev/null || { echo "userdel $u failed" >&2; exit 1; }
    echo "$u"
done
"""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Instance:
    group: str
    index: int
    id: str
    vm: VM

    @property
    def name(self) -> str:
        return f"{self.group}/{self.id}"


class DirectorEmulator:
    """Start with `start()` (or as a context manager); `url`, `uaa_url`, `ca_pem`,
    `ca_cert_path` tell clients where and what to trust."""

    def __init__(
        self,
        deployments: dict[str, Sequence[VM]],
        *,
        clients: dict[str, Client] | None = None,
        auth: str = "uaa",
        token_lifetime_s: int = 3600,
        gateway: tuple[str, str] | None = None,
    ) -> None:
        self.deployments = {name: list(vms) for name, vms in deployments.items()}
        self.clients = clients or {"pgrecovery": Client(secrets.token_urlsafe(16))}
        if auth not in ("uaa", "basic"):
            raise ValueError(f"auth must be uaa or basic, not {auth!r}")
        self.auth = auth
        self.token_lifetime_s = token_lifetime_s
        self.gateway = gateway
        self.uuid = str(uuid.uuid4())
        self.pki: Pki = make_pki()
        self._signing_key = secrets.token_bytes(32)
        self._tasks: dict[int, Task] = {}
        self._task_ids = itertools.count(1)
        self._lock = threading.Lock()
        self._work: list[tuple[Task, Callable[[Task], str]]] = []
        self._work_ready = threading.Condition(self._lock)
        self._stopping = False
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []
        self._tmp = tempfile.TemporaryDirectory(prefix="boshdirector-")
        self.ca_cert_path = Path(self._tmp.name) / "ca.pem"
        self.ca_cert_path.write_text(self.pki.ca_pem)
        self.url = ""
        self.uaa_url = ""
        # ---- faults and observations for tests
        self.ssh_task_error: str | None = None
        """When set, `ssh setup` tasks end in `error` with this message (nothing is created)."""
        self.host_key_override: dict[str, str] = {}
        """VM name → the `host_public_key` to report instead of the VM's own."""
        self.hold_tasks = threading.Event()
        """While set, tasks stay `processing` (a deterministic moment to kill a client)."""
        self.hold_before: dict[str, int] = {}
        """Task description (`ssh: setup`, `ssh: cleanup`) → which one of them (1 = the first)
        to hold `processing` before its effects, until `release()`."""
        self.hold_after: dict[str, int] = {}
        """The same, held after its effects (e.g. the user exists on the VMs, the client does
        not know yet)."""
        self._counts: dict[str, int] = {}
        self.holding = threading.Event()
        """Set while a task is held by `hold_before`/`hold_after`."""
        self._released = threading.Event()
        self.instance_overrides: dict[str, dict[str, Any]] = {}
        """VM name → fields to report instead (`id`, `ips`, `job_state`): a recreated VM."""
        self.requests: list[tuple[str, str]] = []
        """(method, path) of every request, in order."""
        self.tokens_issued = 0

    # ------------------------------------------------------------------ life cycle
    def __enter__(self) -> DirectorEmulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert = Path(self._tmp.name) / "server.pem"
        cert.write_text(self.pki.cert_pem + self.pki.key_pem)
        cert.chmod(0o600)
        ctx.load_cert_chain(cert)
        for role in ("director", "uaa"):
            handler = type(f"{role}Handler", (_Handler,), {"emulator": self, "role": role})
            server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            server.daemon_threads = True
            server.socket = ctx.wrap_socket(server.socket, server_side=True)
            self._servers.append(server)
            t = threading.Thread(target=server.serve_forever, name=f"bosh-{role}", daemon=True)
            t.start()
            self._threads.append(t)
        self.url = f"https://127.0.0.1:{self._servers[0].server_address[1]}"
        self.uaa_url = f"https://127.0.0.1:{self._servers[1].server_address[1]}"
        worker = threading.Thread(target=self._run_tasks, name="bosh-tasks", daemon=True)
        worker.start()
        self._threads.append(worker)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._work_ready.notify_all()
        self.hold_tasks.clear()
        self._released.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for t in self._threads:
            t.join(timeout=10)
        self._tmp.cleanup()

    # ------------------------------------------------------------------ what tests look at
    def instances(self, deployment: str) -> list[Instance]:
        return [
            Instance(
                group=vm.name.split("/")[0],
                index=vm.index,
                id=str(
                    self.instance_overrides.get(vm.name, {}).get(
                        "id", uuid.uuid5(uuid.NAMESPACE_URL, f"{self.uuid}/{deployment}/{vm.name}")
                    )
                ),
                vm=vm,
            )
            for vm in self.deployments[deployment]
        ]

    def ssh_users(self, deployment: str) -> dict[str, list[str]]:
        """VM name → the users under /var/vcap/bosh_ssh on it."""
        out: dict[str, list[str]] = {}
        for vm in self.deployments[deployment]:
            proc = vm.run(
                "awk -F: '$6 ~ \"^/var/vcap/bosh_ssh/\" {print $1}' /etc/passwd", check=False
            )
            out[vm.name] = proc.stdout.split()
        return out

    def task(self, task_id: int) -> Task:
        return self._tasks[task_id]

    def release(self) -> None:
        """Let held tasks go on (and hold none from now on)."""
        self.hold_before.clear()
        self.hold_after.clear()
        self._released.set()

    def _hold(self, task: Task, when: dict[str, int]) -> None:
        if when.get(task.description) != self._counts.get(task.description):
            return
        self.holding.set()
        while not self._released.wait(0.05) and not self._stopping:
            pass

    # ------------------------------------------------------------------ tokens
    def issue_token(self, client_id: str) -> dict[str, Any]:
        now = int(time.time())
        client = self.clients[client_id]
        payload = {
            "jti": uuid.uuid4().hex,
            "client_id": client_id,
            "sub": client_id,
            "scope": list(client.scopes),
            "iat": now,
            "exp": now + self.token_lifetime_s,
            "iss": f"{self.uaa_url}/oauth/token",
            "grant_type": "client_credentials",
        }
        head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        body = _b64(json.dumps(payload).encode())
        sig = _b64(hmac.new(self._signing_key, f"{head}.{body}".encode(), hashlib.sha256).digest())
        self.tokens_issued += 1
        return {
            "access_token": f"{head}.{body}.{sig}",
            "token_type": "bearer",
            "expires_in": self.token_lifetime_s - 1,
            "scope": " ".join(client.scopes),
            "jti": payload["jti"],
        }

    def verify_token(self, token: str) -> tuple[str, tuple[str, ...]] | None:
        try:
            head, body, sig = token.split(".")
        except ValueError:
            return None
        want = _b64(hmac.new(self._signing_key, f"{head}.{body}".encode(), hashlib.sha256).digest())
        if not hmac.compare_digest(want, sig):
            return None
        payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        if payload["exp"] <= time.time():
            return None
        return payload["client_id"], tuple(payload["scope"])

    # ------------------------------------------------------------------ tasks
    def _enqueue(
        self, description: str, deployment: str, user: str, work: Callable[[Task], str]
    ) -> Task:
        with self._lock:
            task = Task(next(self._task_ids), description, deployment, user)
            self._tasks[task.id] = task
            self._work.append((task, work))
            self._work_ready.notify()
        return task

    def _run_tasks(self) -> None:
        # One worker, tasks in order: a real director runs them on a worker pool; one is
        # enough for what tests do and keeps the effects on the VMs in request order.
        while True:
            with self._lock:
                while not self._work and not self._stopping:
                    self._work_ready.wait()
                if self._stopping:
                    return
                task, work = self._work.pop(0)
                task.state = "processing"
                task.started_at = int(time.time())
            self._event(task, "started")
            while self.hold_tasks.is_set() and not self._stopping:
                time.sleep(0.05)
            self._counts[task.description] = self._counts.get(task.description, 0) + 1
            try:
                self._hold(task, self.hold_before)
                result = work(task)
                self._hold(task, self.hold_after)
            except TaskError as e:
                task.error = str(e)
                task.events.append(
                    json.dumps(
                        {"time": int(time.time()), "error": {"code": 450001, "message": str(e)}}
                    )
                    + "\n"
                )
                task.state = "error"
            except Exception as e:
                task.error = f"{type(e).__name__}: {e}"
                task.state = "error"
            else:
                task.result = result
                self._event(task, "finished")
                task.state = "done"

    @staticmethod
    def _event(task: Task, stage: str) -> None:
        task.events.append(
            json.dumps(
                {
                    "time": int(time.time()),
                    "stage": task.description,
                    "tags": [],
                    "total": 1,
                    "task": stage,
                    "index": 1,
                    "state": "started" if stage == "started" else "finished",
                    "progress": 0 if stage == "started" else 100,
                }
            )
            + "\n"
        )

    def vm_infos(self, deployment: str) -> str:
        lines = []
        for inst in self.instances(deployment):
            over = self.instance_overrides.get(inst.vm.name, {})
            running = inst.vm.running
            # As the agent: process states are monit's (`OK`/`Running` → running).
            processes = [
                {"name": n, "state": "running" if st in ("OK", "Running") else "failing"}
                for n, st in (inst.vm.monit_status() if running else {}).items()
            ]
            healthy = inst.vm.agent_state() == "running" and all(
                p["state"] == "running" for p in processes
            )
            state = over.get("job_state") or (
                "unresponsive agent" if not running else "running" if healthy else "failing"
            )
            lines.append(
                json.dumps(
                    {
                        "agent_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"agent/{inst.id}")),
                        "job_name": inst.group,
                        "id": inst.id,
                        "index": inst.index,
                        "job_state": state,
                        "active": running,
                        "bootstrap": inst.index == 0,
                        "ips": over.get("ips", [inst.vm.address]),
                        "az": "z1",
                        "state": "started",
                        "vm_cid": f"vm-{inst.id[:8]}",
                        "vm_type": "default",
                        "disk_cids": [f"disk-{inst.id[:8]}"],
                        "vm_created_at": "2026-01-01T00:00:00Z",
                        "processes": processes,
                        "resurrection_paused": False,
                        "ignore": False,
                    }
                )
            )
        return "\n".join(lines) + "\n"

    def _targets(self, deployment: str, target: dict[str, Any]) -> list[Instance]:
        group = target.get("job") or ""
        wanted = {str(x) for x in (target.get("indexes") or []) + (target.get("ids") or [])}
        found = [
            i
            for i in self.instances(deployment)
            if (not group or i.group == group)
            and (not wanted or str(i.index) in wanted or i.id in wanted)
        ]
        if not found:
            what = f"instance group '{group}'" if group else "instances"
            raise TaskError(f"No {what} found in deployment '{deployment}' for {sorted(wanted)}")
        return found

    def ssh_setup(self, deployment: str, target: dict[str, Any], user: str, key: str) -> str:
        if self.ssh_task_error is not None:
            raise TaskError(self.ssh_task_error)
        out = []
        for inst in self._targets(deployment, target):
            if not inst.vm.running:
                raise TaskError(f"Timed out sending 'ssh' to instance: '{inst.name}'")
            proc = inst.vm.run(
                _SETUP, env={"SSH_USER": user, "SSH_PUBLIC_KEY": key}, check=False, timeout=60
            )
            if proc.returncode != 0:
                raise TaskError(
                    f"Action Failed ssh: Creating user: {proc.stderr.strip() or proc.stdout}"
                )
            host_key = self.host_key_override.get(inst.vm.name, proc.stdout)
            entry: dict[str, Any] = {
                "command": "setup",
                "status": "success",
                "ip": inst.vm.address,
                "host_public_key": host_key,
                "id": inst.id,
                "index": inst.index,
                "job": inst.group,
            }
            if self.gateway:
                entry["gateway_host"], entry["gateway_user"] = self.gateway
            out.append(entry)
        return json.dumps(out)

    def ssh_cleanup(self, deployment: str, target: dict[str, Any], user_regex: str) -> str:
        re.compile(user_regex)  # the agent refuses a bad regex the same way
        out = []
        for inst in self._targets(deployment, target):
            if not inst.vm.running:
                raise TaskError(f"Timed out sending 'ssh' to instance: '{inst.name}'")
            proc = inst.vm.run(_CLEANUP, env={"USER_REGEX": user_regex}, check=False, timeout=60)
            if proc.returncode != 0:
                raise TaskError(f"Action Failed ssh: SSH Cleanup: {proc.stderr.strip()}")
            out.append(
                {
                    "command": "cleanup",
                    "status": "success",
                    "ip": inst.vm.address,
                    "id": inst.id,
                    "index": inst.index,
                    "job": inst.group,
                }
            )
        return json.dumps(out)


class _Handler(BaseHTTPRequestHandler):
    emulator: DirectorEmulator
    role: str
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tests read emulator.requests instead of stderr noise

    # ---------------------------------------------------------------- plumbing
    def _send(
        self,
        status: int,
        body: bytes | str | Any = b"",
        *,
        ctype: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        if not isinstance(body, bytes | str):
            body = json.dumps(body)
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, code: int, description: str) -> None:
        self._send(status, {"code": code, "description": description})

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _basic(self) -> tuple[str, str] | None:
        value = self.headers.get("Authorization", "")
        if not value.lower().startswith("basic "):
            return None
        try:
            user, _, password = base64.b64decode(value[6:]).decode().partition(":")
        except ValueError:
            return None
        return user, password

    def _caller(self) -> tuple[str, tuple[str, ...]] | None:
        em = self.emulator
        value = self.headers.get("Authorization", "")
        if em.auth == "uaa":
            if not value.lower().startswith("bearer "):
                return None
            return em.verify_token(value[7:])
        creds = self._basic()
        if creds is None:
            return None
        client = em.clients.get(creds[0])
        if client is None or not hmac.compare_digest(client.secret, creds[1]):
            return None
        return creds[0], client.scopes

    # ---------------------------------------------------------------- verbs
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        em = self.emulator
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        em.requests.append((method, self.path))
        try:
            if self.role == "uaa":
                self._uaa(method, parts.path)
            else:
                self._director(method, parts.path, query)
        except BrokenPipeError:
            pass

    def _uaa(self, method: str, path: str) -> None:
        em = self.emulator
        if method == "GET" and path in ("/info", "/login"):
            self._send(200, {"app": {"version": "77.0.0"}, "prompts": {}})
            return
        if method != "POST" or path != "/oauth/token":
            self._send(404, {"error": "not_found"})
            return
        form = {k: v[-1] for k, v in parse_qs(self._body().decode()).items()}
        creds = self._basic()
        if creds is None and "client_id" in form:
            creds = (form["client_id"], form.get("client_secret", ""))
        client = em.clients.get(creds[0]) if creds else None
        if creds is None or client is None or not hmac.compare_digest(client.secret, creds[1]):
            self._send(
                401,
                {"error": "unauthorized", "error_description": "Bad credentials"},
                headers={"WWW-Authenticate": 'Basic realm="UAA/client"'},
            )
            return
        if form.get("grant_type") != "client_credentials":
            self._send(
                400,
                {"error": "unsupported_grant_type", "error_description": "client_credentials only"},
            )
            return
        self._send(200, em.issue_token(creds[0]))

    def _director(self, method: str, path: str, query: dict[str, str]) -> None:
        em = self.emulator
        if method == "GET" and path == "/info":
            auth: dict[str, Any] = {"type": "basic", "options": {}}
            if em.auth == "uaa":
                auth = {"type": "uaa", "options": {"url": em.uaa_url, "urls": [em.uaa_url]}}
            self._send(
                200,
                {
                    "name": "pgrecovery-test-director",
                    "uuid": em.uuid,
                    "version": "282.0.0 (00000000)",
                    "user": None,
                    "cpi": "warden_cpi",
                    "stemcell_os": "ubuntu-jammy",
                    "stemcell_version": "1.600",
                    "user_authentication": auth,
                    "features": {
                        "config_server": {"status": False, "extras": {"urls": []}},
                        "local_dns": {"status": True, "extras": {"use_uuid_hostnames": False}},
                        "snapshots": {"status": False},
                    },
                },
            )
            return
        caller = self._caller()
        if caller is None:
            self._send(401, "Not authorized: '" + path + "'\n", ctype="text/plain")
            return
        user, scopes = caller
        admin = ADMIN_SCOPE in scopes or f"bosh.{em.uuid}.admin" in scopes
        read = admin or READ_SCOPE in scopes or f"bosh.{em.uuid}.read" in scopes
        m = re.fullmatch(r"/tasks/(\d+)(/output)?", path)
        if method == "GET" and m:
            task = em._tasks.get(int(m.group(1)))
            if task is None:
                self._error(404, 10001, f"Task {m.group(1)} not found")
                return
            if not m.group(2):
                self._send(200, task.summary())
                return
            kind = query.get("type", "debug")
            text = {"result": task.result, "event": "".join(task.events)}.get(kind, "")
            data = text.encode()
            rng = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if rng:
                start = int(rng.group(1))
                if start >= len(data):
                    self._send(416, b"", ctype="text/plain")
                    return
                self._send(
                    206,
                    data[start:],
                    ctype="text/plain",
                    headers={"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"},
                )
                return
            self._send(200, data, ctype="text/plain")
            return
        if method == "GET" and path == "/deployments":
            if not read:
                self._send(401, f"Not authorized: '{path}'\n", ctype="text/plain")
                return
            self._send(
                200,
                [
                    {
                        "name": d,
                        "releases": [],
                        "stemcells": [],
                        "cloud_config": "none",
                        "teams": [],
                    }
                    for d in em.deployments
                ],
            )
            return
        m = re.fullmatch(r"/deployments/([^/]+)(?:/(instances|vms|ssh))?", path)
        if not m:
            self._error(404, 10000, f"Unknown path '{path}'")
            return
        name, what = m.group(1), m.group(2)
        if name not in em.deployments:
            self._error(404, 70000, f"Deployment '{name}' doesn't exist")
            return
        if not read:
            self._send(401, f"Not authorized: '{path}'\n", ctype="text/plain")
            return
        if method == "GET" and what is None:
            self._send(200, {"manifest": f"name: {name}\n"})
            return
        if method == "GET" and what in ("instances", "vms"):
            if query.get("format") == "full":
                task = em._enqueue("retrieve vm-stats", name, user, lambda _t: em.vm_infos(name))
                self._send(302, b"", headers={"Location": f"/tasks/{task.id}"})
                return
            self._send(
                200,
                [
                    {
                        "agent_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"agent/{i.id}")),
                        "cid": f"vm-{i.id[:8]}",
                        "job": i.group,
                        "index": i.index,
                        "id": i.id,
                        "az": "z1",
                        "ips": em.instance_overrides.get(i.vm.name, {}).get("ips", [i.vm.address]),
                        "expects_vm": True,
                    }
                    for i in em.instances(name)
                ],
            )
            return
        if method == "POST" and what == "ssh":
            # ssh needs admin (the director's deployment-level `admin` permission);
            # bosh.read is not enough.
            if not admin:
                self._send(401, f"Not authorized: '{path}'\n", ctype="text/plain")
                return
            try:
                req = json.loads(self._body() or b"{}")
                command = req["command"]
                target = req.get("target") or {}
                params = req.get("params") or {}
            except (ValueError, KeyError, TypeError):
                self._error(400, 40000, "Invalid ssh request")
                return
            if command == "setup":
                ssh_user, key = params.get("user", ""), params.get("public_key", "")
                if not ssh_user or not key:
                    self._error(400, 40000, "ssh setup needs params.user and params.public_key")
                    return
                task = em._enqueue(
                    "ssh: setup",
                    name,
                    user,
                    lambda _t: em.ssh_setup(name, target, ssh_user, key),
                )
            elif command == "cleanup":
                regex = params.get("user_regex", "")
                if not regex:
                    self._error(400, 40000, "ssh cleanup needs params.user_regex")
                    return
                task = em._enqueue(
                    "ssh: cleanup",
                    name,
                    user,
                    lambda _t: em.ssh_cleanup(name, target, regex),
                )
            else:
                self._error(400, 40000, f"Unknown ssh command '{command}'")
                return
            self._send(302, b"", headers={"Location": f"/tasks/{task.id}"})
            return
        self._error(404, 10000, f"Unknown path '{path}'")
