"""monit on BOSH VMs: read `monit summary`, stop/start a service, wait for a state.

Why this module exists: the runbook stops and starts processes with monit, and monit's CLI
returns at once while the work continues in the daemon ("stop pending", "start pending",
"Initializing"). Every step therefore polls `monit summary` until the wanted state or a
timeout. Two output formats exist in the wild (formats.md, verified):

* monit 5.33 (current stemcells): a fixed-width table, `postgresql-ha   OK   Process`; long
  names and states are cut with `...` (`Not monitored - start p...`); on a terminal it draws
  boxes with ANSI colours (we never request a tty, but strip both anyway).
* monit 5.2 (old BOSH stemcells): `Process 'postgresql-ha'   running`.

States are normalised to `ServiceState`; a cut state is resolved by prefix against the known
states, and stays UNKNOWN (never guessed) when the prefix is ambiguous.
"""

from __future__ import annotations

import asyncio
import enum
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

from pgrecovery.adapters.ssh import RemoteShell
from pgrecovery.cluster.nodes import A9sLayout, Node
from pgrecovery.errors import NotReadyYet, RemoteCommandFailed


class ServiceState(enum.Enum):
    RUNNING = "running"
    NOT_MONITORED = "not monitored"
    START_PENDING = "start pending"
    STOP_PENDING = "stop pending"
    INITIALIZING = "initializing"
    RESTART_PENDING = "restart pending"
    FAILED = "failed"
    """Does not exist, Execution failed, Data access error, …: monitored but not healthy."""
    UNKNOWN = "unknown"


# Known full state texts (lower case) → state. Order matters only for readability.
_STATES: dict[str, ServiceState] = {
    # monit 5.33
    "ok": ServiceState.RUNNING,
    "not monitored": ServiceState.NOT_MONITORED,
    "not monitored - start pending": ServiceState.START_PENDING,
    "initializing - start pending": ServiceState.START_PENDING,
    "ok - start pending": ServiceState.START_PENDING,
    "ok - stop pending": ServiceState.STOP_PENDING,
    "not monitored - stop pending": ServiceState.STOP_PENDING,
    "ok - restart pending": ServiceState.RESTART_PENDING,
    "initializing": ServiceState.INITIALIZING,
    "does not exist": ServiceState.FAILED,
    "execution failed": ServiceState.FAILED,
    "data access error": ServiceState.FAILED,
    "execution failed | does not exist": ServiceState.FAILED,
    "data access error | does not exist": ServiceState.FAILED,
    "not monitored - monitor pending": ServiceState.NOT_MONITORED,
    # monit 5.2
    "running": ServiceState.RUNNING,
    "stop pending": ServiceState.STOP_PENDING,
    "start pending": ServiceState.START_PENDING,
    "restart pending": ServiceState.RESTART_PENDING,
    "monitor pending": ServiceState.INITIALIZING,
    "initializing - monitor pending": ServiceState.INITIALIZING,
}
_FAILED_WORDS = ("does not exist", "failed", "error", "mismatch", "timeout")

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_OLD_ROW = re.compile(
    r"^\s*(?P<type>[A-Z][a-z]+(?: [a-z]+)?) '(?P<name>[^']+)'\s+(?P<state>\S.*?)\s*$"
)
_NEW_ROW = re.compile(
    r"^\s*(?P<name>\S+)\s{2,}(?P<state>\S.*?)\s{2,}(?P<type>[A-Z][A-Za-z ]*?)\s*$"
)
_TYPES = {"Process", "System", "File", "Filesystem", "Directory", "Host", "Fifo", "Program",
          "Network", "Remote Host"}


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    state: ServiceState
    raw: str
    kind: str


def normalise_state(raw: str) -> ServiceState:
    text = " ".join(raw.strip().lower().split())
    if text in _STATES:
        return _STATES[text]
    if text.endswith("..."):
        prefix = text[:-3].rstrip()
        matches = {state for full, state in _STATES.items() if full.startswith(prefix)}
        if len(matches) == 1:
            return matches.pop()
        if not matches and any(w.startswith(prefix) or w in prefix for w in _FAILED_WORDS):
            return ServiceState.FAILED
        return ServiceState.UNKNOWN
    if any(w in text for w in _FAILED_WORDS):
        return ServiceState.FAILED
    return ServiceState.UNKNOWN


def parse_summary(text: str) -> dict[str, ServiceStatus]:
    """Services of `monit summary` by name (both monit 5.2 and 5.33 formats)."""
    services: dict[str, ServiceStatus] = {}
    for raw_line in text.splitlines():
        line = _ANSI.sub("", raw_line).replace("\r", "")
        line = re.sub(r"[│┃|]", "  ", line) if "│" in line else line
        if not line.strip() or set(line.strip()) <= set("─┌┐└┘├┤┬┴┼-+ "):
            continue
        old = _OLD_ROW.match(line)
        if old and old.group("type").split()[0] in {t.split()[0] for t in _TYPES}:
            name, state_text, kind = old.group("name"), old.group("state"), old.group("type")
        else:
            new = _NEW_ROW.match(line)
            if not new or new.group("type") not in _TYPES:
                continue
            name, state_text, kind = new.group("name"), new.group("state"), new.group("type")
            if name == "Service" or state_text == "Status":
                continue
        services[name] = ServiceStatus(name, normalise_state(state_text), state_text, kind)
    return services


def find_service(services: dict[str, ServiceStatus], name: str) -> ServiceStatus | None:
    """Look a service up, allowing for monit 5.33 cutting long names with `...`."""
    if name in services:
        return services[name]
    for key, status in services.items():
        if key.endswith("...") and name.startswith(key[:-3]):
            return status
    return None


# ----------------------------------------------------------------- remote operations

# Poll monit four times a second: its own cycle on BOSH is 10-30 s for health checks, but
# stop/start completion shows up in `summary` as soon as the start/stop program returns, and
# a recovery waits on monit about ten times in a row (each wait lost half an interval on
# average: ~5 s per recovery at 1 s). A `summary` is one SSH exec, a few tens of ms.
POLL_INTERVAL = 0.25
# Stopping postgresql-ha is a fast shutdown (seconds); starting a standby may replay WAL.
DEFAULT_STOP_TIMEOUT = 120.0
DEFAULT_START_TIMEOUT = 300.0


async def summary(shell: RemoteShell, node: Node, layout: A9sLayout) -> dict[str, ServiceStatus]:
    res = await shell.run_root(node.endpoint, [layout.monit, "summary"], timeout=30)
    services = parse_summary(res.stdout)
    if not services:
        raise RemoteCommandFailed(
            f"{node.name}: `monit summary` printed no services: {res.stdout[:300]!r}"
        )
    return services


async def _control(
    shell: RemoteShell, node: Node, layout: A9sLayout, action: str, service: str
) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", service):
        raise ValueError(f"bad monit service name {service!r}")
    await shell.run_root(node.endpoint, [layout.monit, action, service], timeout=30)


async def wait_for(
    shell: RemoteShell,
    node: Node,
    layout: A9sLayout,
    wanted: dict[str, ServiceState],
    *,
    timeout: float,
    interval: float = POLL_INTERVAL,
) -> dict[str, ServiceStatus]:
    """Poll `monit summary` until every service in `wanted` is in its state.

    A service that is absent from the summary counts as NOT_MONITORED (e.g. a repmgr process
    that this deployment does not run). Raises NotReadyYet naming the laggards on timeout.
    """
    deadline = time.monotonic() + timeout
    while True:
        services = await summary(shell, node, layout)
        lagging = []
        for name, state in wanted.items():
            found = find_service(services, name)
            current = found.state if found else ServiceState.NOT_MONITORED
            if current is not state:
                lagging.append(f"{name} is {found.raw if found else 'absent'!r}")
        if not lagging:
            return services
        if time.monotonic() >= deadline:
            raise NotReadyYet(
                f"{node.name}: after {timeout:.0f}s monit reports " + ", ".join(lagging)
            )
        await asyncio.sleep(interval)


async def ensure_stopped(
    shell: RemoteShell,
    node: Node,
    layout: A9sLayout,
    services: Sequence[str],
    *,
    also_wait_for: Sequence[str] = (),
    timeout: float = DEFAULT_STOP_TIMEOUT,
) -> bool:
    """`monit stop` each service not already Not monitored, then wait. True if it changed."""
    current = await summary(shell, node, layout)
    changed = False
    for name in services:
        found = find_service(current, name)
        if found is not None and found.state is not ServiceState.NOT_MONITORED:
            await _control(shell, node, layout, "stop", name)
            changed = True
    wanted = dict.fromkeys((*services, *also_wait_for), ServiceState.NOT_MONITORED)
    await wait_for(shell, node, layout, wanted, timeout=timeout)
    return changed


async def ensure_started(
    shell: RemoteShell,
    node: Node,
    layout: A9sLayout,
    services: Sequence[str],
    *,
    timeout: float = DEFAULT_START_TIMEOUT,
    wait: bool = True,
) -> bool:
    """`monit start` each service that is not running, then wait for OK. True if it changed.

    Starting postgresql-ha does not start a repmgr that depends on it (formats.md), so callers
    list both. `wait=False` only issues the starts: for a server in archive recovery, whose
    outcome (promotion, or a FATAL end of replay that monit would restart in a loop) the
    caller judges from PostgreSQL itself.
    """
    current = await summary(shell, node, layout)
    changed = False
    for name in services:
        found = find_service(current, name)
        if found is None:
            raise RemoteCommandFailed(f"{node.name}: monit has no service {name!r}")
        if found.state in (ServiceState.NOT_MONITORED, ServiceState.FAILED,
                           ServiceState.UNKNOWN):
            await _control(shell, node, layout, "start", name)
            changed = True
    if not wait:
        return changed
    await wait_for(
        shell, node, layout, dict.fromkeys(services, ServiceState.RUNNING), timeout=timeout
    )
    return changed
