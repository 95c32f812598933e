"""The BOSH director (and its UAA): the only module that speaks the director's HTTP API.

Why this module exists: on real BOSH VMs nobody has a standing SSH user; people reach them
with `bosh -d <dep> instances` and `bosh -d <dep> ssh`, and so does pgrecovery. The director
lists the instances (group, index, id, IPs, process state), creates an ephemeral user with our
public key on each VM (`POST /deployments/<d>/ssh` `setup`, a task), hands back each VM's host
key (`host_public_key`, the agent's `/etc/ssh/ssh_host_rsa_key.pub`), and removes the users
again (`cleanup` with `user_regex`). Trust is anchored in the director's CA: TLS is verified
against it, and the host keys it returns are the only ones SSH accepts.

Decisions recorded here:

* Plain `http.client` in a worker thread, not an HTTP library: five endpoints, explicit
  redirects (the director answers task-starting requests with `302 Location: /tasks/<id>`,
  which must not be followed blindly as a POST), and one `ssl.SSLContext` built from the CA
  only — there is no way to turn verification off.
* Authentication as `/info` says: `uaa` → client-credentials grant at the UAA (client id and
  secret in HTTP basic auth, as the bosh CLI sends them), the token renewed a minute before it
  expires; `basic` → the same client id and secret as the director's basic auth.
* Errors map into pgrecovery.errors at this boundary (`reason` says which):
  UAA 401 / director 401 → SecretError `DirectorAuthenticationFailed` (the credentials
  Secret); 403, or 401 on `ssh` only → AuthenticationFailed `DirectorForbidden` (the client's
  scope); 404 → ClusterError `DirectorNotFound` with the director's own words; a task that
  ends in `error`/`cancelled` → ClusterError `DirectorTaskFailed` with its message; a
  certificate that does not chain to the CA → SecretError `DirectorCertificateUntrusted`;
  connection errors, timeouts, 5xx and a task that outlives its deadline → NodeUnreachable
  `DirectorUnreachable` (retryable).
* Credentials and tokens never appear in logs, messages or reprs.
* Ephemeral users are named `bosh_pgrecovery_<run id>`: the agent's `ssh cleanup` only ever
  deletes users whose name starts with `bosh_` (bosh-agent platform/linux_platform.go
  `findEphemeralUsersMatching`), so a user named otherwise would be created by `setup` and
  never removed by `cleanup`.
* The ephemeral key pair is ed25519, generated per recovery and held in memory only.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import logging
import re
import ssl
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncssh

from pgrecovery.errors import (
    AuthenticationFailed,
    ClusterError,
    ConfigurationError,
    InvalidSpec,
    NodeUnreachable,
    SecretError,
)

log = logging.getLogger(__name__)

USER_PREFIX = "bosh_pgrecovery_"
"""Every ephemeral user pgrecovery creates starts with this (see the module docstring)."""

DEFAULT_TIMEOUT_S = 30.0
"""One HTTP request (connect + response)."""
DEFAULT_TASK_TIMEOUT_S = 300.0
"""A director task (ssh setup on three VMs takes seconds; a busy director queues tasks)."""
TOKEN_RENEW_MARGIN_S = 60.0
"""Renew a UAA token this long before it expires, so no request carries a token that dies
in flight."""
TASK_POLL_S = 0.5

_RUN_ID = re.compile(r"^[a-z0-9]{4,16}$")


@dataclass(frozen=True)
class DirectorCredentials:
    """A UAA client (or director basic-auth user) and its secret; the repr hides the secret."""

    client: str
    secret: str = field(repr=False)


@dataclass(frozen=True)
class DirectorInstance:
    """One instance as the director reports it (`GET /deployments/<d>/instances?format=full`)."""

    group: str
    index: int
    id: str
    ips: tuple[str, ...]
    process_state: str
    """`running`, `failing`, `stopped`, `unresponsive agent`, … (the agent's job state)."""
    vm_cid: str = ""

    @property
    def name(self) -> str:
        """`pg/0`: the name the runbooks and pgrecovery's status use."""
        return f"{self.group}/{self.index}"

    @property
    def address(self) -> str:
        return self.ips[0] if self.ips else ""


@dataclass(frozen=True)
class SshHost:
    """One VM opened by `ssh setup`: where to connect and the only host key to accept."""

    group: str
    index: int
    id: str
    ip: str
    host_public_key: str
    """`<type> <base64>` (any comment dropped), exactly as the director returned it."""
    gateway_host: str = ""
    gateway_user: str = ""

    @property
    def name(self) -> str:
        return f"{self.group}/{self.index}"

    def known_hosts_line(self) -> str:
        return f"{self.ip} {self.host_public_key}\n"


@dataclass(frozen=True)
class EphemeralKey:
    """An ed25519 key pair for one recovery; never written anywhere."""

    private_openssh: bytes = field(repr=False)
    public_openssh: str

    @classmethod
    def generate(cls, comment: str) -> EphemeralKey:
        key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
        return cls(
            private_openssh=bytes(key.export_private_key("openssh")),
            public_openssh=bytes(key.export_public_key("openssh")).decode().strip(),
        )


def ssh_user_name(run_id: str) -> str:
    """`bosh_pgrecovery_<run id>`; `run_id` is a short lowercase id (4-16 of [a-z0-9])."""
    if not _RUN_ID.match(run_id):
        raise InvalidSpec(f"run id {run_id!r} must be 4-16 lowercase letters or digits")
    return USER_PREFIX + run_id


def ca_context(ca_pem: str) -> ssl.SSLContext:
    """A client TLS context that trusts exactly the given CA (PEM text)."""
    if "BEGIN CERTIFICATE" not in ca_pem:
        raise SecretError("the director CA is not a PEM certificate")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca_pem)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@dataclass
class _Response:
    status: int
    body: bytes
    location: str


class DirectorClient:
    """One director, one set of credentials. Safe for sequential use from one event loop."""

    def __init__(
        self,
        url: str,
        ca_pem: str,
        credentials: DirectorCredentials,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        task_timeout: float = DEFAULT_TASK_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        parts = urllib.parse.urlsplit(url if "://" in url else f"https://{url}")
        if parts.scheme != "https" or not parts.hostname:
            raise InvalidSpec(f"{url!r} is not an https:// director URL", field="director")
        self.url = f"https://{parts.hostname}:{parts.port or 25555}"
        self._ctx = ca_context(ca_pem)
        self._credentials = credentials
        self._timeout = timeout
        self._task_timeout = task_timeout
        self._clock = clock
        self._info: dict[str, Any] | None = None
        self._token: str | None = None
        self._token_expires = 0.0

    def __repr__(self) -> str:
        return f"<DirectorClient {self.url} client={self._credentials.client!r}>"

    # ------------------------------------------------------------------ HTTP
    def _request_sync(
        self, base: str, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> _Response:
        parts = urllib.parse.urlsplit(base)
        host = parts.hostname or ""
        conn = http.client.HTTPSConnection(
            host, parts.port or 443, timeout=self._timeout, context=self._ctx
        )
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return _Response(resp.status, data, resp.getheader("Location") or "")
        finally:
            conn.close()

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        base: str | None = None,
        what: str = "",
    ) -> _Response:
        target = base or self.url
        try:
            return await asyncio.to_thread(
                self._request_sync, target, method, path, body, dict(headers or {})
            )
        except ssl.SSLCertVerificationError as exc:
            raise SecretError(
                f"{target}: TLS certificate not trusted by the director CA given "
                f"({exc.verify_message}); check caCertSecretRef / BOSH_CA_CERT",
                reason="DirectorCertificateUntrusted",
            ) from None
        except (TimeoutError, OSError, http.client.HTTPException) as exc:
            raise NodeUnreachable(
                f"{target}: {what or path}: cannot reach the director: "
                f"{type(exc).__name__}: {exc}",
                reason="DirectorUnreachable",
            ) from None

    async def info(self) -> dict[str, Any]:
        """`GET /info` (unauthenticated): name, uuid, version, user_authentication."""
        if self._info is None:
            resp = await self._request("GET", "/info", what="director info")
            self._raise_for(resp, "/info")
            self._info = _json(resp.body, "/info")
        return self._info

    async def _auth_header(self) -> str:
        info = await self.info()
        auth = info.get("user_authentication") or {}
        creds = self._credentials
        if auth.get("type") != "uaa":
            raw = f"{creds.client}:{creds.secret}".encode()
            return "Basic " + base64.b64encode(raw).decode()
        if self._token is None or self._clock() >= self._token_expires - TOKEN_RENEW_MARGIN_S:
            await self._fetch_token(str((auth.get("options") or {}).get("url") or ""))
        return f"Bearer {self._token}"

    async def _fetch_token(self, uaa_url: str) -> None:
        if not uaa_url.startswith("https://"):
            raise ConfigurationError(f"the director's UAA URL {uaa_url!r} is not https")
        creds = self._credentials
        raw = f"{urllib.parse.quote(creds.client)}:{urllib.parse.quote(creds.secret)}"
        base = uaa_url.rstrip("/")
        path = urllib.parse.urlsplit(base).path + "/oauth/token"
        started = self._clock()
        resp = await self._request(
            "POST",
            path,
            body=urllib.parse.urlencode({"grant_type": "client_credentials"}).encode(),
            headers={
                "Authorization": "Basic " + base64.b64encode(raw.encode()).decode(),
                "Content-Type": "application/x-www-form-urlencoded",
                "Accept": "application/json",
            },
            base=base,
            what="UAA token",
        )
        if resp.status in (400, 401, 403):
            detail = _json_or_text(resp.body)
            words = detail.get("error_description") if isinstance(detail, dict) else detail
            raise SecretError(
                f"the UAA at {base} refused client {creds.client!r}: {words}; "
                "check the director credentials (client id and secret)",
                reason="DirectorAuthenticationFailed",
            )
        self._raise_for(resp, "UAA token")
        token = _json(resp.body, "UAA token")
        self._token = str(token["access_token"])
        self._token_expires = started + float(token.get("expires_in") or 0)
        log.info(
            "UAA token for client %s from %s, valid %.0f s",
            creds.client,
            base,
            self._token_expires - started,
        )

    async def _authed(
        self, method: str, path: str, *, body: bytes | None = None, what: str = ""
    ) -> _Response:
        headers = {"Authorization": await self._auth_header(), "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        resp = await self._request(method, path, body=body, headers=headers, what=what)
        if resp.status == 401 and self._token is not None:
            # A token revoked or expired early: one fresh token, one retry.
            self._token = None
            headers["Authorization"] = await self._auth_header()
            resp = await self._request(method, path, body=body, headers=headers, what=what)
        return resp

    def _raise_for(self, resp: _Response, what: str, *, needs_admin: bool = False) -> None:
        if resp.status < 300:
            return
        if resp.status == 302:
            return
        detail = _json_or_text(resp.body)
        words = (
            detail.get("description") or detail.get("error_description") or str(detail)
            if isinstance(detail, dict)
            else str(detail)
        ).strip()
        if resp.status == 403 or (resp.status == 401 and needs_admin):
            raise AuthenticationFailed(
                f"the director refused {what} for client {self._credentials.client!r} "
                f"({resp.status}: {words}); `ssh` needs the deployment's admin permission "
                "(scope bosh.admin, or bosh.<director uuid>.admin, or a team admin scope of "
                "the deployment's team) - bosh.read only lists instances",
                reason="DirectorForbidden",
            )
        if resp.status == 401:
            raise SecretError(
                f"the director refused the credentials of client {self._credentials.client!r} "
                f"({words}); check the director credentials",
                reason="DirectorAuthenticationFailed",
            )
        if resp.status == 404:
            raise ClusterError(f"director: {what}: {words}", reason="DirectorNotFound")
        if resp.status >= 500:
            raise NodeUnreachable(
                f"director: {what}: HTTP {resp.status}: {words}", reason="DirectorUnreachable"
            )
        raise ClusterError(
            f"director: {what}: HTTP {resp.status}: {words}", reason="DirectorRequestFailed"
        )

    # ------------------------------------------------------------------ tasks
    async def wait_task(self, task_id: int, what: str) -> str:
        """Follow `/tasks/<id>` until it ends; its `result` output, or an error."""
        deadline = self._clock() + self._task_timeout
        while True:
            resp = await self._authed("GET", f"/tasks/{task_id}", what=what)
            self._raise_for(resp, what)
            task = _json(resp.body, what)
            state = str(task.get("state"))
            if state == "done":
                break
            if state in ("error", "cancelled", "timeout"):
                raise ClusterError(
                    f"director task {task_id} ({what}) ended {state}: "
                    f"{task.get('result') or 'no message'}",
                    reason="DirectorTaskFailed",
                )
            if self._clock() > deadline:
                raise NodeUnreachable(
                    f"director task {task_id} ({what}) still {state} after "
                    f"{self._task_timeout:.0f} s",
                    reason="DirectorUnreachable",
                )
            await asyncio.sleep(TASK_POLL_S)
        resp = await self._authed("GET", f"/tasks/{task_id}/output?type=result", what=what)
        self._raise_for(resp, what)
        return resp.body.decode()

    def _task_id(self, resp: _Response, what: str) -> int:
        m = re.search(r"/tasks/(\d+)$", resp.location)
        if resp.status != 302 or not m:
            raise ClusterError(
                f"director: {what}: expected a task (302 to /tasks/<id>), got HTTP "
                f"{resp.status}",
                reason="DirectorRequestFailed",
            )
        return int(m.group(1))

    # ------------------------------------------------------------------ API
    async def instances(self, deployment: str) -> list[DirectorInstance]:
        """The deployment's instances with IPs and process state (a task, as `bosh instances`)."""
        what = f"instances of deployment '{deployment}'"
        path = f"/deployments/{_segment(deployment)}/instances?format=full"
        resp = await self._authed("GET", path, what=what)
        self._raise_for(resp, what)
        task_id = self._task_id(resp, what)
        out = []
        for line in (await self.wait_task(task_id, what)).splitlines():
            if not line.strip():
                continue
            row = _json(line.encode(), what)
            if row.get("index") is None:
                continue  # an instance without a VM yet
            out.append(
                DirectorInstance(
                    group=str(row.get("job_name") or ""),
                    index=int(row["index"]),
                    id=str(row.get("id") or ""),
                    ips=tuple(str(ip) for ip in row.get("ips") or ()),
                    process_state=str(row.get("job_state") or ""),
                    vm_cid=str(row.get("vm_cid") or ""),
                )
            )
        return sorted(out, key=lambda i: (i.group, i.index))

    async def ssh_setup(
        self, deployment: str, group: str, user: str, public_key: str
    ) -> list[SshHost]:
        """Create `user` with `public_key` and passwordless sudo on every VM of `group`."""
        what = f"ssh setup for {deployment}/{group}"
        body = {
            "command": "setup",
            "deployment_name": deployment,
            "target": {"job": group, "indexes": [], "ids": []},
            "params": {"user": user, "public_key": public_key},
        }
        path = f"/deployments/{_segment(deployment)}/ssh"
        resp = await self._authed("POST", path, body=json.dumps(body).encode(), what=what)
        self._raise_for(resp, what, needs_admin=True)
        result = json.loads(await self.wait_task(self._task_id(resp, what), what) or "[]")
        hosts = []
        for row in result:
            if row.get("status") != "success":
                raise ClusterError(
                    f"director: {what}: instance {row.get('job')}/{row.get('index')}: "
                    f"status {row.get('status')!r}",
                    reason="DirectorTaskFailed",
                )
            hosts.append(
                SshHost(
                    group=str(row.get("job") or group),
                    index=int(row["index"]),
                    id=str(row.get("id") or ""),
                    ip=str(row.get("ip") or ""),
                    host_public_key=_host_key(row.get("host_public_key"), what),
                    gateway_host=str(row.get("gateway_host") or ""),
                    gateway_user=str(row.get("gateway_user") or ""),
                )
            )
        if not hosts:
            raise ClusterError(
                f"director: {what}: no instance was opened", reason="DirectorTaskFailed"
            )
        return sorted(hosts, key=lambda h: h.index)

    async def ssh_cleanup(self, deployment: str, group: str, user_regex: str) -> None:
        """Remove the users matching `user_regex` (and starting with `bosh_`) from every VM
        of `group`, and wait until the director says it is done."""
        what = f"ssh cleanup for {deployment}/{group}"
        body = {
            "command": "cleanup",
            "deployment_name": deployment,
            "target": {"job": group, "indexes": [], "ids": []},
            "params": {"user_regex": user_regex},
        }
        path = f"/deployments/{_segment(deployment)}/ssh"
        resp = await self._authed("POST", path, body=json.dumps(body).encode(), what=what)
        self._raise_for(resp, what, needs_admin=True)
        await self.wait_task(self._task_id(resp, what), what)


def _segment(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise InvalidSpec(f"{name!r} is not a BOSH name")
    return name


def _host_key(value: object, what: str) -> str:
    words = str(value or "").split()
    if len(words) < 2 or not words[0].startswith(("ssh-", "ecdsa-")):
        raise ClusterError(
            f"director: {what}: no usable host_public_key ({str(value)[:40]!r})",
            reason="DirectorTaskFailed",
        )
    return f"{words[0]} {words[1]}"


def _json(body: bytes, what: str) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise ClusterError(
            f"director: {what}: response is not JSON: {body[:120]!r}",
            reason="DirectorRequestFailed",
        ) from None


def _json_or_text(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return body.decode(errors="replace")[:300]
