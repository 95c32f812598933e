"""A small fault-injecting HTTP proxy to put in front of a real object store in tests.

Why this module exists: the retry and timeout behaviour of the backups layer (and of a whole
recovery) can only be trusted if it is exercised against the faults real stores produce —
S3 `SlowDown`/`InternalError`, Azure `ServerBusy`, a connection reset half-way through a
ranged GET, a server that accepts and never answers, a slow link — while the bytes that do get
through come from a real server (moto, SeaweedFS, Azurite). Mocking boto3 or azure-core would
test our guesses about those SDKs instead of the SDKs.

How it works: `FaultProxy` listens on 127.0.0.1 (its own thread and event loop, so the code
under test can be async or a subprocess) and forwards each HTTP request to the upstream server.
Every request is matched against the programmed `Fault`s (method, path regex, ranged or not;
skip the first N matches; apply M times or forever) and is then forwarded, answered with an
error, cut after K body bytes, closed, held open without an answer, forwarded slowly, or held
at a gate until the test opens it.
Every request is recorded, so tests can count retries.

Decisions:
- One request per client connection: the proxy forwards with `Connection: close` and answers
  with `Connection: close`. HTTP framing is then trivial (no keep-alive bookkeeping), and the
  clients (urllib3, azure-core's requests transport) simply open a new connection next time.
- Signatures stay valid: the Host header is passed through untouched (SigV4 signs the host the
  client used, which is the proxy's), and Azure SharedKey does not sign the host.
- A reset is a real TCP RST (SO_LINGER 0), which is what a load balancer dropping a connection
  produces; `reset_after(..., rst=False)` closes with FIN instead (a truncated body).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from urllib.parse import urlsplit, urlunsplit

READ_CHUNK = 64 * 1024


class FaultKind(StrEnum):
    ERROR = "error"  # answer with `status` and `body` instead of forwarding
    RESET = "reset"  # forward, but cut the connection after `after_bytes` of the body
    CLOSE = "close"  # read the request, close without any answer
    HANG = "hang"  # read the request, never answer (until the client gives up)
    THROTTLE = "throttle"  # forward the response body at `rate` bytes per second
    GATE = "gate"  # hold the request until the test opens the gate, then forward it


@dataclass
class Fault:
    """One programmed fault and the requests it applies to."""

    kind: FaultKind
    times: int | None = 1
    """How many matching requests get the fault; None = every one (a persistent fault)."""
    skip: int = 0
    """Matching requests let through untouched before the fault starts."""
    method: str | None = None
    path: str | None = None
    """Regular expression searched in the request target (path and query)."""
    ranged: bool | None = None
    """True: only requests with a Range header (S3) / x-ms-range (Azure); False: only without."""
    status: int = 503
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    after_bytes: int = 0
    rst: bool = True
    rate: float = 0.0
    opened: bool = field(default=False, init=False)
    """GATE only: held requests go on once the test sets this (`FaultProxy.open`)."""
    matched: int = field(default=0, init=False)
    applied: int = field(default=0, init=False)

    def matches(self, request: Request) -> bool:
        if self.method is not None and request.method != self.method:
            return False
        if self.path is not None and not re.search(self.path, request.target):
            return False
        return self.ranged is None or self.ranged == request.ranged

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.applied >= self.times


@dataclass(frozen=True)
class Request:
    """One request the proxy saw, and what it did with it."""

    method: str
    target: str
    ranged: bool
    action: str
    """`forward` or the kind of the fault applied."""


# ---------------------------------------------------------------- fault constructors


def s3_error(
    code: str = "SlowDown", status: int = 503, *, times: int | None = 1, **match: object
) -> Fault:
    """An S3 error answer with the XML body S3 sends (`SlowDown`, `InternalError`, …)."""
    message = {
        "SlowDown": "Please reduce your request rate.",
        "InternalError": "We encountered an internal error. Please try again.",
        "ServiceUnavailable": "Service is unable to handle request.",
    }.get(code, code)
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        "<RequestId>FAULTPROXY</RequestId><HostId>faultproxy</HostId></Error>"
    ).encode()
    return Fault(
        FaultKind.ERROR,
        times=times,
        status=status,
        body=body,
        headers=(("Content-Type", "application/xml"),),
        **match,  # type: ignore[arg-type]
    )


def azure_error(
    code: str = "ServerBusy", status: int = 503, *, times: int | None = 1, **match: object
) -> Fault:
    """An Azure Blob error answer (`ServerBusy`, `InternalError`, `OperationTimedOut`)."""
    body = (
        '<?xml version="1.0" encoding="utf-8"?>'
        f"<Error><Code>{code}</Code><Message>The server is busy (fault proxy).</Message></Error>"
    ).encode()
    return Fault(
        FaultKind.ERROR,
        times=times,
        status=status,
        body=body,
        headers=(("Content-Type", "application/xml"), ("x-ms-error-code", code)),
        **match,  # type: ignore[arg-type]
    )


def reset_after(
    after_bytes: int, *, rst: bool = True, times: int | None = 1, **match: object
) -> Fault:
    """Forward the response, then cut the connection after `after_bytes` of its body."""
    return Fault(FaultKind.RESET, times=times, after_bytes=after_bytes, rst=rst, **match)  # type: ignore[arg-type]


def close(*, times: int | None = 1, **match: object) -> Fault:
    """Read the request and close the connection without answering."""
    return Fault(FaultKind.CLOSE, times=times, **match)  # type: ignore[arg-type]


def hang(*, times: int | None = 1, **match: object) -> Fault:
    """Read the request and never answer; the connection ends when the client gives up."""
    return Fault(FaultKind.HANG, times=times, **match)  # type: ignore[arg-type]


def throttle(rate: float, *, times: int | None = None, **match: object) -> Fault:
    """Forward response bodies at `rate` bytes per second."""
    return Fault(FaultKind.THROTTLE, times=times, rate=rate, **match)  # type: ignore[arg-type]


def gate(*, times: int | None = None, **match: object) -> Fault:
    """Hold matching requests (unanswered) until `FaultProxy.open(fault)`; then forward them.
    A test stops a download at a chosen point with it, deterministically."""
    return Fault(FaultKind.GATE, times=times, **match)  # type: ignore[arg-type]


def closed_port() -> int:
    """A local port where nothing listens (connection refused), for the unreachable case."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- HTTP helpers


def _split_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers.append((name.strip(), value.strip()))
    return lines[0], headers


def _join_head(first: str, headers: list[tuple[str, str]]) -> bytes:
    return ("\r\n".join([first, *(f"{k}: {v}" for k, v in headers)]) + "\r\n\r\n").encode("latin-1")


def _with_close(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    kept = [(k, v) for k, v in headers if k.lower() not in ("connection", "keep-alive")]
    return [*kept, ("Connection", "close")]


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def _abort(writer: asyncio.StreamWriter, *, rst: bool) -> None:
    sock = writer.get_extra_info("socket")
    if rst and sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    if rst:
        writer.transport.abort()
    else:
        writer.close()


# ---------------------------------------------------------------- the proxy


class FaultProxy:
    """HTTP proxy on 127.0.0.1:<port> in front of `upstream_host:upstream_port`.

    Use as a context manager (`with FaultProxy.for_url(server.endpoint_url) as proxy:`); program
    faults with `add()`, read what happened with `requests` / `count()`.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self._faults: list[Fault] = []
        self._requests: list[Request] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None

    @classmethod
    def for_url(cls, url: str) -> FaultProxy:
        parts = urlsplit(url)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"need an http://host:port URL, got {url!r}")
        return cls(parts.hostname, parts.port)

    # ------------------------------------------------------------ addresses

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url_for(self, upstream_url: str) -> str:
        """`upstream_url` with its host and port replaced by the proxy's (keeps the path,
        e.g. Azurite's `/devstoreaccount1`)."""
        parts = urlsplit(upstream_url)
        return urlunsplit(parts._replace(netloc=f"127.0.0.1:{self.port}"))

    # ------------------------------------------------------------ programming

    def add(self, *faults: Fault) -> FaultProxy:
        with self._lock:
            self._faults.extend(faults)
        return self

    def open(self, fault: Fault) -> None:
        """Let the requests a GATE fault holds (and every later match) through."""
        with self._lock:
            fault.opened = True

    def clear(self) -> None:
        """Remove every fault (requests keep being recorded)."""
        with self._lock:
            self._faults.clear()

    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def count(
        self, *, method: str | None = None, ranged: bool | None = None, action: str | None = None
    ) -> int:
        return sum(
            1
            for r in self.requests
            if (method is None or r.method == method)
            and (ranged is None or r.ranged == ranged)
            and (action is None or r.action == action)
        )

    def _pick(self, request_line: str, headers: list[tuple[str, str]]) -> tuple[Fault | None, str]:
        method, _, rest = request_line.partition(" ")
        target = rest.rsplit(" ", 1)[0]
        ranged = _header(headers, "range") is not None or _header(headers, "x-ms-range") is not None
        probe = Request(method, target, ranged, "")
        chosen: Fault | None = None
        with self._lock:
            for fault in self._faults:
                if fault.exhausted or not fault.matches(probe):
                    continue
                fault.matched += 1
                if fault.matched <= fault.skip:
                    continue
                fault.applied += 1
                chosen = fault
                break
            action = chosen.kind.value if chosen is not None else "forward"
            self._requests.append(Request(method, target, ranged, action))
        return chosen, method

    # ------------------------------------------------------------ lifecycle

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault proxy did not start within 10 s")
        if self._startup_error is not None:
            raise RuntimeError(f"fault proxy failed to start: {self._startup_error}")
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._accept, "127.0.0.1", 0)
            )
            self.port = int(self._server.sockets[0].getsockname()[1])
        except BaseException as exc:  # reported by start()
            self._startup_error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._shutdown())
            loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(15)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------ serving

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client went away (often on purpose: it gave up on a hung request)
        finally:
            self._tasks.discard(task)
            if not writer.is_closing():
                writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, headers = _split_head(head)
        fault, method = self._pick(request_line, headers)
        kind = fault.kind if fault is not None else None
        if kind is FaultKind.CLOSE:
            _abort(writer, rst=False)
            return
        if kind is FaultKind.HANG:
            while await reader.read(READ_CHUNK):  # until the client closes
                pass
            return
        if fault is not None and kind is FaultKind.GATE:
            # Polled: the gate is opened from the test's thread, not this loop's.
            while not fault.opened:
                await asyncio.sleep(0.02)
            fault = None
        if fault is not None and kind is FaultKind.ERROR:
            answer = [
                *fault.headers,
                ("Content-Length", str(len(fault.body))),
                ("Connection", "close"),
            ]
            writer.write(_join_head(f"HTTP/1.1 {fault.status} Fault Injected", answer))
            writer.write(fault.body)
            await writer.drain()
            return
        await self._forward(reader, writer, request_line, headers, method, fault)

    async def _forward(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request_line: str,
        headers: list[tuple[str, str]],
        method: str,
        fault: Fault | None,
    ) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        pump = asyncio.create_task(self._pump(reader, up_writer))
        try:
            up_writer.write(_join_head(request_line, _with_close(headers)))
            await up_writer.drain()
            while True:  # skip interim 1xx answers (100 Continue) after forwarding them
                status_line, resp_headers = _split_head(await up_reader.readuntil(b"\r\n\r\n"))
                status = int(status_line.split()[1])
                writer.write(_join_head(status_line, _with_close(resp_headers)))
                if status >= 200:
                    break
            length = _header(resp_headers, "content-length")
            remaining: int | None
            if method == "HEAD" or status in (204, 304):
                remaining = 0
            else:
                remaining = int(length) if length is not None else None  # None: until EOF
            await self._copy_body(up_reader, writer, remaining, fault)
        finally:
            pump.cancel()
            with contextlib.suppress(BaseException):
                await pump
            up_writer.close()
            with contextlib.suppress(Exception):
                await up_writer.wait_closed()

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Request body (if any) from the client to the upstream server."""
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(READ_CHUNK):
                writer.write(data)
                await writer.drain()

    @staticmethod
    async def _copy_body(
        up_reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        remaining: int | None,
        fault: Fault | None,
    ) -> None:
        sent = 0
        kind = fault.kind if fault is not None else None
        while remaining is None or remaining > 0:
            want = READ_CHUNK if remaining is None else min(READ_CHUNK, remaining)
            data = await up_reader.read(want)
            if not data:
                break
            if remaining is not None:
                remaining -= len(data)
            if fault is not None and kind is FaultKind.RESET:
                room = fault.after_bytes - sent
                if len(data) >= room:
                    writer.write(data[:room])
                    await writer.drain()
                    # Let loopback deliver the bytes before the RST discards the send buffer.
                    await asyncio.sleep(0.05)
                    _abort(writer, rst=fault.rst)
                    return
            if fault is not None and kind is FaultKind.THROTTLE and fault.rate > 0:
                for i in range(0, len(data), 8192):
                    writer.write(data[i : i + 8192])
                    await writer.drain()
                    await asyncio.sleep(len(data[i : i + 8192]) / fault.rate)
            else:
                writer.write(data)
                await writer.drain()
            sent += len(data)
        await writer.drain()


@contextlib.contextmanager
def fault_proxy(upstream_url: str) -> Iterator[FaultProxy]:
    """A started proxy in front of `upstream_url`, stopped afterwards."""
    proxy = FaultProxy.for_url(upstream_url).start()
    try:
        yield proxy
    finally:
        proxy.stop()
