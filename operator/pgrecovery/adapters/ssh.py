"""SSH to the BOSH VMs: the only module that imports asyncssh.

Why this module exists: every a9s-pg runbook step is a root command on a VM, reached the way a
person reaches it with `bosh ssh` + `sudo su -`: an unprivileged login user with passwordless
sudo. This module owns everything about that hop — keys, host-key verification, one reused
connection per node, quoting, timeouts, streaming a dump onto the VM — and converts every
asyncssh exception at the boundary into `pgrecovery.errors`, so nothing above it ever sees an
asyncssh type.

Decisions recorded here:

* Commands are strings only at the very last moment. Callers give an argv list
  (`root_command`) or a *constant* shell script plus positional arguments (`root_shell`);
  values from a spec travel as `$1`, `$2`, … and are `shlex.quote`d. Nothing is ever built by
  concatenating an untrusted value into shell text.
* Root via `sudo -n --`: `-n` makes a missing sudo right fail at once ("a password is required")
  instead of hanging on a prompt; that failure maps to `AuthenticationFailed`.
* Timeouts are enforced twice: on the VM with coreutils `timeout --kill-after` (which signals
  the whole process group, so a psql started by a shell dies too, and exits 124), and locally
  with a slightly longer asyncio timeout as a backstop for a VM that stops answering.
* Secrets never appear on a command line: anything secret is written to the command's stdin.
* Host keys are verified against a known_hosts text. The only way around it is the explicit
  `insecure_ignore_host_keys=True`, which logs a WARNING on every connect.
* Uploads stream over an exec channel into `sudo -n -- dd of=<path>.part` rather than SFTP.
  The staging directory is `root:vcap` g+w (runbook), and the `bosh ssh` user is not reliably
  in group `vcap`, so an SFTP session cannot write there; SFTP into a home or /tmp directory
  and `sudo mv` would put a multi-GB dump on the small root disk first. Measured on this
  shared 2-core machine against a local sshd (128 MiB of random data, sha256 on both sides
  included): exec+dd 92-100 MiB/s, SFTP sequential write 80-97 MiB/s. SSH encryption is the
  bottleneck either way, so the mechanism that works is also not slower.
  The file is written as `<path>.part`, checked with sha256 (openssl) as root, and only then renamed
  to `<path>`: a file at the final path is always complete and verified.
* Resume: a `ReplayableSource` (e.g. `FileSource`, a local file) can restart at any offset, so
  an interrupted upload continues after the existing `.part` prefix once the prefix's sha256 on
  the VM equals the local prefix's. A plain `AsyncIterable[bytes]` (the decrypting stream) can
  not be replayed and always starts from byte 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import shlex
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import asyncssh

from pgrecovery.errors import (
    AuthenticationFailed,
    ChecksumMismatch,
    ConfigurationError,
    HostKeyMismatch,
    NodeUnreachable,
    RemoteCommandFailed,
    RemoteCommandTimeout,
    SecretError,
)

log = logging.getLogger(__name__)

SUDO: tuple[str, ...] = ("sudo", "-n", "--")

# How long `timeout` waits after SIGTERM before SIGKILL: long enough for psql/monit to exit
# cleanly, short enough that a stuck command does not hold a step much past its budget.
KILL_AFTER_SECONDS = 10

# Local backstop on top of the remote `timeout`: connection round trips and the kill-after.
LOCAL_TIMEOUT_GRACE_SECONDS = KILL_AFTER_SECONDS + 20

# A node that neither answers nor refuses within this time is unreachable. 15 s covers a BOSH
# VM under load; longer only delays a retry that the engine schedules anyway.
DEFAULT_CONNECT_TIMEOUT = 15.0

# Keepalives detect a dropped connection (VM rebooted, network cut) in ~45 s instead of the
# TCP timeout of many minutes; the next command then reconnects.
KEEPALIVE_INTERVAL = 15.0
KEEPALIVE_COUNT_MAX = 3

DEFAULT_COMMAND_TIMEOUT = 120.0

# Upload: 1 MiB writes keep the SSH channel window full; an upload making no progress for
# this long is treated as a dead connection.
UPLOAD_CHUNK = 1024 * 1024
# Ciphers in order of preference. asyncssh's default puts chacha20-poly1305 first, which it
# runs as three library calls per packet; AES-GCM is one call with AES-NI. Measured on the
# test machine, 400 MiB through `cat > /dev/null`: the client spends about half the CPU
# (0.43-0.67 s instead of 0.85-1.5 s), and sshd's side is cheaper too, which matters because
# the dump upload shares the CPUs with decryption and decompression. All four are standard
# OpenSSH ciphers (sshd on stemcells offers them all); the server's list decides among them.
CIPHER_PREFERENCE = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes256-ctr",
    "aes128-ctr",
)
UPLOAD_STALL_TIMEOUT = 120.0
# sha256sum of a multi-GB file on a BOSH persistent disk: ~200 MB/s, so allow 1 s per 100 MB.
SHA256_SECONDS_PER_BYTE = 1 / 100e6
# The digest of a file on the VM. `openssl dgst` uses the CPU's SHA extensions where coreutils'
# sha256sum does not: 1 GB in 0.7 s instead of 2.3 s (measured on the test machine), and the
# check of a staged dump is on the critical path of every recovery. Stemcells ship openssl;
# sha256sum stays the fallback. Both print the hex digest first; the path is validated (it
# starts with `/`), so it cannot be read as an option.
_SHA256_OF = (
    'if command -v openssl >/dev/null 2>&1; then openssl dgst -sha256 -r "$1"; '
    'else sha256sum -- "$1"; fi'
)

STDERR_HEAD_LINES = 5
STDERR_HEAD_CHARS = 600

# sudo's refusals; older versions print "<user> is not in the sudoers file" unprefixed.
_SUDO_REFUSED = re.compile(
    r"^(?:sudo: (?:a password is required|.*not allowed to execute|a terminal is required)"
    r"|(?:sudo: )?\S+ is not in the sudoers file)",
    re.MULTILINE,
)
_REMOTE_PATH = re.compile(r"^/[A-Za-z0-9._/@+-]+$")


# ----------------------------------------------------------------- command building


def _check_arg(arg: str) -> str:
    if not isinstance(arg, str):
        raise TypeError(f"command arguments must be str, got {type(arg).__name__}")
    if "\x00" in arg:
        raise ValueError("command arguments must not contain NUL")
    return arg


def shell_join(argv: Sequence[str]) -> str:
    """Quote an argv list into one POSIX shell word list (every element `shlex.quote`d)."""
    if not argv:
        raise ValueError("empty command")
    return " ".join(shlex.quote(_check_arg(a)) for a in argv)


def root_argv(argv: Sequence[str], *, timeout: float | None = None) -> list[str]:
    """The argv that runs `argv` as root via `sudo -n`, optionally under coreutils `timeout`."""
    if not argv:
        raise ValueError("empty command")
    prefix: list[str] = list(SUDO)
    if timeout is not None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        prefix += ["timeout", f"--kill-after={KILL_AFTER_SECONDS}", f"{timeout:.0f}s"]
    return prefix + [_check_arg(a) for a in argv]


def root_command(argv: Sequence[str], *, timeout: float | None = None) -> str:
    """Shell text for the login user's shell that runs `argv` as root.

    >>> root_command(["cat", "/etc/x; rm -rf /"])
    "sudo -n -- cat '/etc/x; rm -rf /'"
    """
    return shell_join(root_argv(argv, timeout=timeout))


def shell_script_argv(script: str, *args: str) -> list[str]:
    """argv running a constant bash `script` with `args` as `$1`, `$2`, … (never spliced in)."""
    return ["bash", "-c", _check_arg(script), "pgrecovery", *(_check_arg(a) for a in args)]


def root_shell(script: str, *args: str, timeout: float | None = None) -> str:
    """Shell text that runs a constant bash script as root with positional arguments."""
    return root_command(shell_script_argv(script, *args), timeout=timeout)


def validate_remote_path(path: str) -> str:
    """Absolute paths of a conservative character set only; no `..` components."""
    if not _REMOTE_PATH.match(path) or "/../" in f"{path}/" or "//" in path:
        raise ValueError(f"unsafe remote path {path!r}")
    return path


def _stderr_head(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()][:STDERR_HEAD_LINES]
    return "\n".join(lines)[:STDERR_HEAD_CHARS]


def _describe(command: str) -> str:
    return command if len(command) <= 160 else command[:157] + "..."


# ----------------------------------------------------------------- models


@dataclass(frozen=True)
class SshEndpoint:
    """Where one VM is reached. `name` (e.g. `pg/0`) is only used in messages and logs."""

    name: str
    host: str
    port: int = 22

    @property
    def label(self) -> str:
        return f"{self.name} ({self.host}:{self.port})"


@dataclass(frozen=True)
class SshGateway:
    """A jumpbox every node connection is tunnelled through (`bosh ssh --gw-host`); its own
    user, key and known_hosts (verified like the nodes')."""

    host: str
    user: str
    private_key: bytes = field(repr=False)
    known_hosts: str = field(repr=False)
    port: int = 22

    @property
    def label(self) -> str:
        return f"gateway {self.user}@{self.host}:{self.port}"


@dataclass(frozen=True)
class SshAuth:
    """Credentials and trust anchors for all nodes of one target.

    The private key arrives as bytes (a Kubernetes Secret's content) and is never logged:
    the dataclass repr hides it.
    """

    username: str
    private_key: bytes = field(repr=False)
    known_hosts: str | None = field(default=None, repr=False)
    passphrase: bytes | None = field(default=None, repr=False)
    insecure_ignore_host_keys: bool = False
    """Skip host-key verification. Loud on purpose: a WARNING is logged on every connect."""
    gateway: SshGateway | None = None
    """Reach every node through this jumpbox (one connection to it, shared)."""

    @classmethod
    def from_files(
        cls,
        username: str,
        private_key_path: str | Path,
        known_hosts_path: str | Path | None,
        *,
        passphrase: bytes | None = None,
        insecure_ignore_host_keys: bool = False,
    ) -> SshAuth:
        try:
            key = Path(private_key_path).read_bytes()
            known = Path(known_hosts_path).read_text() if known_hosts_path else None
        except OSError as exc:
            raise ConfigurationError(f"cannot read SSH key or known_hosts: {exc}") from exc
        return cls(
            username=username,
            private_key=key,
            known_hosts=known,
            passphrase=passphrase,
            insecure_ignore_host_keys=insecure_ignore_host_keys,
        )


@dataclass(frozen=True)
class CommandResult:
    exit_status: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class UploadResult:
    path: str
    size: int
    sha256: str
    resumed_from: int = 0
    """Bytes that were already on the VM and not sent again (0 when started from scratch)."""


ProgressCallback = Callable[[int], None]
"""Called with the number of bytes of the file that are on the VM so far."""


@runtime_checkable
class ReplayableSource(Protocol):
    """A byte source that can be read again from any offset (needed to resume an upload)."""

    def open_at(self, offset: int) -> AsyncIterator[bytes]: ...


@dataclass(frozen=True)
class FileSource:
    """A local file as a `ReplayableSource`; reads happen in a worker thread."""

    path: Path
    chunk_size: int = UPLOAD_CHUNK

    async def open_at(self, offset: int) -> AsyncIterator[bytes]:
        fh = await asyncio.to_thread(self.path.open, "rb")
        try:
            await asyncio.to_thread(fh.seek, offset)
            while chunk := await asyncio.to_thread(fh.read, self.chunk_size):
                yield chunk
        finally:
            await asyncio.to_thread(fh.close)


class RemoteShell(Protocol):
    """What the cluster layer needs from SSH; `SshPool` implements it, unit tests fake it."""

    async def run_root(
        self,
        node: SshEndpoint,
        argv: Sequence[str],
        *,
        input: bytes | str | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> CommandResult: ...

    def stream_root_lines(
        self, node: SshEndpoint, argv: Sequence[str], *, timeout: float | None = None
    ) -> AsyncIterator[str]: ...

    async def upload(
        self,
        node: SshEndpoint,
        source: AsyncIterable[bytes] | ReplayableSource,
        remote_path: str,
        *,
        progress: ProgressCallback | None = None,
    ) -> UploadResult: ...


# ----------------------------------------------------------------- the pool


class _Client(asyncssh.SSHClient):
    """Remembers whether the connection has dropped, so the pool reconnects next time."""

    def __init__(self) -> None:
        self.closed = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True


@dataclass
class _Conn:
    conn: asyncssh.SSHClientConnection
    client: _Client


class SshPool:
    """One SSH connection per node, reused across commands and reopened after a drop.

    Use as an async context manager or call `close()`; safe for concurrent use by many
    tasks (asyncssh multiplexes channels over one connection).
    """

    def __init__(
        self,
        auth: SshAuth,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        default_timeout: float = DEFAULT_COMMAND_TIMEOUT,
    ) -> None:
        self._auth = auth
        self._connect_timeout = connect_timeout
        self._default_timeout = default_timeout
        self._conns: dict[tuple[str, int], _Conn] = {}
        self._locks: dict[tuple[str, int], asyncio.Lock] = {}
        self._gateway: _Conn | None = None
        self._gateway_lock = asyncio.Lock()
        try:
            self._key = asyncssh.import_private_key(auth.private_key, auth.passphrase)
        except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError) as exc:
            # The library message names the format problem, never the key material.
            raise SecretError(f"the SSH private key cannot be read: {exc}") from None
        self._known_hosts: asyncssh.SSHKnownHosts | None = None
        if not auth.insecure_ignore_host_keys:
            if not auth.known_hosts or not auth.known_hosts.strip():
                raise ConfigurationError(
                    "no known_hosts given: SSH host keys must be verified "
                    "(set target.ssh.knownHostsSecretRef)"
                )
            try:
                self._known_hosts = asyncssh.import_known_hosts(auth.known_hosts)
            except (ValueError, asyncssh.KeyImportError) as exc:
                raise ConfigurationError(f"known_hosts cannot be parsed: {exc}") from None

    async def __aenter__(self) -> SshPool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        conns, self._conns = list(self._conns.values()), {}
        if self._gateway is not None:
            # last: the node connections run inside it
            conns.append(self._gateway)
            self._gateway = None
        for c in conns:
            c.conn.close()
        for c in conns:
            with contextlib.suppress(Exception):
                await c.conn.wait_closed()

    async def _gateway_connection(self) -> asyncssh.SSHClientConnection | None:
        """The jumpbox connection (opened once, reopened after a drop), or None."""
        gw = self._auth.gateway
        if gw is None:
            return None
        async with self._gateway_lock:
            if self._gateway is not None and not self._gateway.client.closed:
                return self._gateway.conn
            try:
                key = asyncssh.import_private_key(gw.private_key)
                known = asyncssh.import_known_hosts(gw.known_hosts)
            except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError, ValueError) as exc:
                raise SecretError(f"{gw.label}: key or known_hosts cannot be read: {exc}") from None
            try:
                conn, raw_client = await asyncio.wait_for(
                    asyncssh.create_connection(
                        _Client, gw.host, gw.port, username=gw.user, client_keys=[key],
                        known_hosts=known, agent_path=None, config=None, password=None,
                        kbdint_auth=False, encryption_algs=CIPHER_PREFERENCE,
                        keepalive_interval=KEEPALIVE_INTERVAL,
                        keepalive_count_max=KEEPALIVE_COUNT_MAX,
                        connect_timeout=self._connect_timeout,
                    ),
                    timeout=self._connect_timeout + 5,
                )
            except asyncssh.HostKeyNotVerifiable as exc:
                raise HostKeyMismatch(
                    f"{gw.label}: host key not trusted by its known_hosts ({exc.reason})"
                ) from None
            except asyncssh.PermissionDenied as exc:
                raise AuthenticationFailed(f"{gw.label}: login refused ({exc.reason})") from None
            except (TimeoutError, asyncssh.Error, OSError) as exc:
                raise NodeUnreachable(
                    f"{gw.label}: cannot connect: {_exc_text(exc)}", reason="GatewayUnreachable"
                ) from None
            if not isinstance(raw_client, _Client):  # pragma: no cover - our factory
                raise TypeError(raw_client)
            self._gateway = _Conn(conn, raw_client)
            log.info("SSH through %s", gw.label)
            return conn

    def forget(self, node: SshEndpoint) -> None:
        """Close and drop the cached connection of one node (next call reconnects)."""
        c = self._conns.pop((node.host, node.port), None)
        if c is not None:
            c.conn.close()

    # ------------------------------------------------------------- connecting

    async def _connection(self, node: SshEndpoint) -> asyncssh.SSHClientConnection:
        key = (node.host, node.port)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self._conns.get(key)
            if cached is not None and not cached.client.closed:
                return cached.conn
            if cached is not None:
                log.info("SSH connection to %s dropped; reconnecting", node.label)
                self._conns.pop(key, None)
            if self._auth.insecure_ignore_host_keys:
                log.warning(
                    "SSH host key of %s is NOT verified (insecure_ignore_host_keys is set); "
                    "anyone on the network path can impersonate this node",
                    node.label,
                )
            tunnel = await self._gateway_connection()
            try:
                conn, raw_client = await asyncio.wait_for(
                    asyncssh.create_connection(
                        _Client,
                        node.host,
                        node.port,
                        tunnel=tunnel,
                        username=self._auth.username,
                        client_keys=[self._key],
                        known_hosts=self._known_hosts,
                        agent_path=None,
                        config=None,
                        password=None,
                        kbdint_auth=False,
                        encryption_algs=CIPHER_PREFERENCE,
                        keepalive_interval=KEEPALIVE_INTERVAL,
                        keepalive_count_max=KEEPALIVE_COUNT_MAX,
                        connect_timeout=self._connect_timeout,
                    ),
                    timeout=self._connect_timeout + 5,
                )
            except asyncssh.HostKeyNotVerifiable as exc:
                raise HostKeyMismatch(
                    f"{node.label}: host key not trusted by known_hosts ({exc.reason}); "
                    "if the VM was recreated, update the known_hosts secret after checking "
                    "the new key out of band"
                ) from None
            except asyncssh.PermissionDenied as exc:
                raise AuthenticationFailed(
                    f"{node.label}: SSH login as {self._auth.username!r} refused "
                    f"({exc.reason}); check the private key and the user"
                ) from None
            except (TimeoutError, asyncssh.Error, OSError) as exc:
                raise NodeUnreachable(
                    f"{node.label}: cannot connect: {_exc_text(exc)}"
                ) from None
            if not isinstance(raw_client, _Client):  # pragma: no cover - our factory
                raise TypeError(raw_client)
            self._conns[key] = _Conn(conn, raw_client)
            log.debug("SSH connected to %s", node.label)
            return conn

    # ------------------------------------------------------------- commands

    async def run(
        self,
        node: SshEndpoint,
        command: str,
        *,
        input: bytes | str | None = None,
        timeout: float | None = None,
        check: bool = True,
        remote_timeout: float | None = None,
    ) -> CommandResult:
        """Run shell text as the login user. Prefer `run_root`; `command` must be built by
        `shell_join`/`root_command`/`root_shell`, never from raw untrusted text."""
        budget = timeout if timeout is not None else self._default_timeout
        data = input.encode() if isinstance(input, str) else input
        started = time.monotonic()
        for attempt in (1, 2):
            conn = await self._connection(node)
            try:
                proc = await conn.run(
                    command,
                    input=data,
                    check=False,
                    encoding=None,
                    timeout=budget + LOCAL_TIMEOUT_GRACE_SECONDS,
                )
            except asyncssh.ChannelOpenError as exc:
                # The channel never opened, so the command did not run: safe to reconnect and
                # try once more (the cached connection was half-dead).
                self.forget(node)
                if attempt == 2:
                    raise NodeUnreachable(f"{node.label}: cannot open a session: {exc}") from None
                continue
            except asyncssh.TimeoutError:
                self.forget(node)
                raise RemoteCommandTimeout(
                    f"{node.label}: no answer within {budget:.0f}s from: {_describe(command)}"
                ) from None
            except (asyncssh.Error, OSError) as exc:
                self.forget(node)
                raise NodeUnreachable(
                    f"{node.label}: connection lost while running a command: {_exc_text(exc)}"
                ) from None
            break
        if proc.exit_status is None and proc.exit_signal is None:
            # sshd always reports an exit status or signal; a channel that ends with neither
            # was torn down with its connection (the VM lost power or sshd died). That is an
            # unreachable node, worth a retry, not a command that failed (seen with
            # tests/integration/test_faults_cluster.py's power cuts: the job poll "exited 255").
            self.forget(node)
            raise NodeUnreachable(
                f"{node.label}: connection lost while running a command (no exit status): "
                f"{_describe(command)}"
            )
        status = proc.exit_status
        if status is None:
            status = 128 + 15  # killed by a signal
        result = CommandResult(status, _decode(proc.stdout), _decode(proc.stderr))
        elapsed = time.monotonic() - started
        if remote_timeout is not None and (
            status == 124 or (status == 137 and elapsed >= remote_timeout)
        ):
            raise RemoteCommandTimeout(
                f"{node.label}: command exceeded {remote_timeout:.0f}s and was killed: "
                f"{_describe(command)}"
            )
        if check and status != 0:
            raise _command_error(node, command, result)
        return result

    async def run_root(
        self,
        node: SshEndpoint,
        argv: Sequence[str],
        *,
        input: bytes | str | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> CommandResult:
        """Run `argv` as root (`sudo -n`) under a remote and a local timeout."""
        budget = timeout if timeout is not None else self._default_timeout
        command = root_command(argv, timeout=budget)
        return await self.run(
            node, command, input=input, timeout=budget, check=check, remote_timeout=budget
        )

    async def stream_root_lines(
        self, node: SshEndpoint, argv: Sequence[str], *, timeout: float | None = None
    ) -> AsyncIterator[str]:
        """Yield stdout lines of a root command as they arrive (for large outputs such as a
        restore log); raises like `run_root` once the command has ended."""
        budget = timeout if timeout is not None else self._default_timeout
        command = root_command(argv, timeout=budget)
        conn = await self._connection(node)
        try:
            async with conn.create_process(command, encoding="utf-8", errors="replace") as proc:
                async with asyncio.timeout(budget + LOCAL_TIMEOUT_GRACE_SECONDS):
                    async for line in proc.stdout:
                        if not line:
                            break  # EOF: asyncssh yields a final empty string
                        yield line.rstrip("\n")
                    stderr = await proc.stderr.read()
                    await proc.wait_closed()
                if proc.exit_status is None and proc.exit_signal is None:
                    raise asyncssh.ConnectionLost("the channel closed without an exit status")
                status = proc.exit_status if proc.exit_status is not None else 255
        except TimeoutError:
            self.forget(node)
            raise RemoteCommandTimeout(
                f"{node.label}: no answer within {budget:.0f}s from: {_describe(command)}"
            ) from None
        except (asyncssh.Error, OSError) as exc:
            self.forget(node)
            raise NodeUnreachable(f"{node.label}: connection lost: {_exc_text(exc)}") from None
        if status == 124:
            raise RemoteCommandTimeout(f"{node.label}: command exceeded {budget:.0f}s")
        if status != 0:
            raise _command_error(node, command, CommandResult(status, "", stderr))

    # ------------------------------------------------------------- upload

    async def remote_sha256(self, node: SshEndpoint, path: str, *, size_hint: int = 0) -> str:
        """sha256 of a file on the VM, computed there as root."""
        validate_remote_path(path)
        res = await self.run_root(
            node,
            shell_script_argv(_SHA256_OF, path),
            timeout=60 + size_hint * SHA256_SECONDS_PER_BYTE,
        )
        digest = res.stdout.split(maxsplit=1)[0] if res.stdout.strip() else ""
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise RemoteCommandFailed(f"{node.label}: unexpected sha256 output {res.stdout!r}")
        return digest

    async def _partial_state(self, node: SshEndpoint, part: str) -> tuple[int, str | None]:
        script = (
            'sha() { ' + _SHA256_OF + '; }\n'
            'if [ -f "$1" ]; then stat -c %s -- "$1"; sha "$1"; else echo 0; fi'
        )
        res = await self.run_root(node, shell_script_argv(script, part), timeout=600)
        lines = res.stdout.split()
        size = int(lines[0]) if lines and lines[0].isdigit() else 0
        digest = lines[1] if size and len(lines) > 1 else None
        return size, digest

    async def upload(
        self,
        node: SshEndpoint,
        source: AsyncIterable[bytes] | ReplayableSource,
        remote_path: str,
        *,
        progress: ProgressCallback | None = None,
    ) -> UploadResult:
        """Stream `source` to `remote_path` as root, verify sha256 on the VM, then rename.

        Resumes after an existing `<remote_path>.part` when `source` is a `ReplayableSource`
        whose first bytes hash like that partial file; otherwise starts from zero.
        """
        validate_remote_path(remote_path)
        part = remote_path + ".part"
        hasher = hashlib.sha256()
        offset = 0
        if isinstance(source, ReplayableSource):
            remote_size, remote_digest = await self._partial_state(node, part)
            if remote_size and remote_digest:
                prefix = await _hash_prefix(source, remote_size)
                if prefix is not None and prefix.hexdigest() == remote_digest:
                    hasher, offset = prefix, remote_size
                    log.info("%s: resuming upload of %s at byte %d", node.label, part, offset)
                else:
                    log.info("%s: partial %s does not match the source; restarting", node.label,
                             part)
            chunks: AsyncIterable[bytes] = source.open_at(offset)
        else:
            chunks = source

        argv = ["dd", f"of={part}", "bs=1M", "status=none"]
        if offset:
            argv += ["oflag=append", "conv=notrunc"]
        command = root_command(argv)
        if progress is not None:
            progress(offset)

        def sent(chunk: bytes, done: int) -> None:
            hasher.update(chunk)
            if progress is not None:
                progress(done)

        status, _stdout, stderr, done = await self._stream_into(
            node, command, chunks, what=f"the upload to {part}", start=offset, on_chunk=sent)
        if status != 0:
            raise _command_error(
                node, command, CommandResult(status or 255, "", _decode(stderr))
            )
        local = hasher.hexdigest()
        remote = await self.remote_sha256(node, part, size_hint=done)
        if remote != local:
            raise ChecksumMismatch(
                f"{node.label}: {part} has sha256 {remote} on the VM but {local} was sent "
                f"({done} bytes); the partial file is kept for inspection"
            )
        await self.run_root(node, ["mv", "-f", "--", part, remote_path], timeout=60)
        return UploadResult(remote_path, done, local, resumed_from=offset)


    async def pipe_root(
        self,
        node: SshEndpoint,
        argv: Sequence[str],
        chunks: AsyncIterable[bytes],
        *,
        timeout: float,
        progress: Callable[[int], None] | None = None,
    ) -> CommandResult:
        """Run `argv` as root with `chunks` as its stdin (the base backup's `tar -x` feed: a
        physical restore unpacks gigabytes into the data directory, staging them as a file
        first would need that much room again); RemoteCommandFailed on a non-zero exit.
        Integrity on the wire is the SSH channel's MAC; the bytes were verified before."""
        command = root_command(argv, timeout=timeout)

        def sent(_chunk: bytes, done: int) -> None:
            if progress is not None:
                progress(done)

        status, stdout, stderr, _done = await self._stream_into(
            node, command, chunks, what=f"streaming into {argv[0]}", on_chunk=sent)
        result = CommandResult(status, _decode(stdout), _decode(stderr))
        if status != 0:
            raise _command_error(node, command, result)
        return result

    async def _stream_into(
        self,
        node: SshEndpoint,
        command: str,
        chunks: AsyncIterable[bytes],
        *,
        what: str,
        start: int = 0,
        on_chunk: Callable[[bytes, int], None] | None = None,
    ) -> tuple[int, bytes, bytes, int]:
        """Feed `chunks` to `command`'s stdin over one channel: (exit status, stdout, stderr,
        bytes counted from `start`). The one place a stream's errors are mapped: a stall is
        RemoteCommandTimeout; a lost connection — also a channel torn down without an exit
        status (VM power cut, sshd killed) — is NodeUnreachable (retryable), never a command
        that failed with 255 (fatal)."""
        done = start
        conn = await self._connection(node)
        try:
            async with conn.create_process(command, encoding=None) as proc:
                async for chunk in chunks:
                    if not chunk:
                        continue
                    proc.stdin.write(chunk)
                    async with asyncio.timeout(UPLOAD_STALL_TIMEOUT):
                        await proc.stdin.drain()
                    done += len(chunk)
                    if on_chunk is not None:
                        on_chunk(chunk, done)
                proc.stdin.write_eof()
                async with asyncio.timeout(UPLOAD_STALL_TIMEOUT):
                    stdout = await proc.stdout.read()
                    stderr = await proc.stderr.read()
                    await proc.wait_closed()
                if proc.exit_status is None and proc.exit_signal is None:
                    raise asyncssh.ConnectionLost("the channel closed without an exit status")
                status = proc.exit_status if proc.exit_status is not None else 255
        except TimeoutError:
            self.forget(node)
            raise RemoteCommandTimeout(
                f"{node.label}: {what} stalled for {UPLOAD_STALL_TIMEOUT:.0f}s after {done} "
                "bytes"
            ) from None
        except (asyncssh.Error, OSError) as exc:
            self.forget(node)
            raise NodeUnreachable(
                f"{node.label}: connection lost during {what} after {done} bytes: "
                f"{_exc_text(exc)}"
            ) from None
        return status, stdout, stderr, done


async def _hash_prefix(source: ReplayableSource, size: int) -> hashlib._Hash | None:
    """sha256 of the first `size` bytes of `source`, or None when the source is shorter."""
    hasher = hashlib.sha256()
    seen = 0
    gen = source.open_at(0)
    try:
        async for chunk in gen:
            take = chunk[: size - seen]
            hasher.update(take)
            seen += len(take)
            if seen >= size:
                return hasher
    finally:
        aclose = getattr(gen, "aclose", None)
        if aclose is not None:
            await aclose()
    return None


def _decode(data: bytes | str | None) -> str:
    if data is None:
        return ""
    if isinstance(data, str):
        return data
    return data.decode("utf-8", errors="replace")


def _exc_text(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.strip()


def _command_error(node: SshEndpoint, command: str, result: CommandResult) -> Exception:
    head = _stderr_head(result.stderr) or _stderr_head(result.stdout)
    if result.exit_status == 1 and _SUDO_REFUSED.search(result.stderr):
        return AuthenticationFailed(
            f"{node.label}: sudo refused for the SSH user ({head}); the user needs "
            "passwordless sudo, as with `bosh ssh`"
        )
    return RemoteCommandFailed(
        f"{node.label}: exit {result.exit_status} from {_describe(command)}: {head}",
        exit_status=result.exit_status,
        stderr=head,
    )
