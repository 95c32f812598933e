"""Runbook step logic with a fake remote shell: the decisions, not the commands' effects.

The fake answers the few commands each step sends from a small in-memory model of three
VMs; the real effects are proven against the simulated VMs in
tests/integration/test_cluster_ops.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass, field

import pytest

from pgrecovery.adapters.ssh import CommandResult, ReplayableSource, SshEndpoint, UploadResult
from pgrecovery.cluster.a9s import A9sOperations, estimate_needed_bytes
from pgrecovery.cluster.monit import ServiceState, wait_for
from pgrecovery.cluster.nodes import A9sLayout, Node, ProgressEvent
from pgrecovery.errors import (
    InsufficientSpace,
    NodeUnreachable,
    NotReadyYet,
    PrimaryAmbiguous,
    RemoteCommandFailed,
)

pytestmark = pytest.mark.unit

NODES = [Node("pg/0", "10.77.0.10"), Node("pg/1", "10.77.0.11"), Node("pg/2", "10.77.0.12")]

SUMMARY = """\
Monit 5.33.0 uptime: 5m
 Service Name                     Status                      Type
 pg-0                             OK                          System
 postgresql-ha                    {pg:<28}Process
 repmgr                           {rm:<28}Process
"""


def _row(i: int, role: str, status: str) -> str:
    return (f" {i + 1}  | pg-{i} | {role} | {status} |          | default  | 100      | 1   "
            f"     | host=10.77.0.1{i} port=5432 user=repmgr dbname=repmgr_cluster")


@dataclass
class FakeVM:
    in_recovery: str = "t"
    pg_up: bool = True
    monit: dict[str, str] = field(default_factory=lambda: {"postgresql-ha": "OK",
                                                           "repmgr": "OK"})
    pending: dict[str, list[str]] = field(default_factory=dict)
    inactive_slots: int = 0
    avail: int = 10 * 2**30
    reachable: bool = True


class FakeShell:
    def __init__(self) -> None:
        self.vms = {n.address: FakeVM() for n in NODES}
        self.vms["10.77.0.10"].in_recovery = "f"
        self.repmgr_rows = [_row(0, "primary", "* running"), _row(1, "standby", "  running"),
                            _row(2, "standby", "  running")]
        self.repmgr_db_gone = False
        self.calls: list[tuple[str, list[str], str | None]] = []

    async def run_root(self, node: SshEndpoint, argv: Sequence[str], *,
                       input: bytes | str | None = None, timeout: float | None = None,
                       check: bool = True) -> CommandResult:
        vm = self.vms[node.host]
        text = input.decode() if isinstance(input, bytes) else input
        self.calls.append((node.host, list(argv), text))
        if not vm.reachable:
            raise NodeUnreachable(f"{node.name}: cannot connect")
        res = self._answer(vm, list(argv), text or "")
        if check and res.exit_status:
            raise RemoteCommandFailed("failed", exit_status=res.exit_status, stderr=res.stderr)
        return res

    def _answer(self, vm: FakeVM, argv: list[str], sql: str) -> CommandResult:
        joined = " ".join(argv)
        if argv[-1] == "summary":
            for name, queue in vm.pending.items():
                if queue:
                    vm.monit[name] = queue.pop(0)
            return CommandResult(0, SUMMARY.format(pg=vm.monit["postgresql-ha"],
                                                   rm=vm.monit["repmgr"]), "")
        if argv[-2] == "stop":
            vm.pending[argv[-1]] = ["OK - stop pending", "Not monitored"]
            return CommandResult(0, "", "")
        if "psql" in argv:
            if not vm.pg_up:
                return CommandResult(2, "", "psql: error: connection to server failed")
            if "pg_is_in_recovery" in sql:
                return CommandResult(0, vm.in_recovery + "\n", "")
            if "count(*) FROM pg_replication_slots" in sql:
                return CommandResult(0, f"{vm.inactive_slots}\n", "")
            if "pg_drop_replication_slot" in sql:
                vm.inactive_slots = 0
                return CommandResult(0, "", "")
        if "cluster show" in joined:
            if self.repmgr_db_gone:
                return CommandResult(6, "", 'ERROR: connection to database failed\nDETAIL: '
                                     'FATAL:  database "repmgr_cluster" does not exist\n')
            header = (" ID | Name | Role    | Status    | Upstream | Location | Priority | "
                      "Timeline | Connection string\n----+------\n")
            return CommandResult(0, header + "\n".join(self.repmgr_rows) + "\n", "")
        if argv[0] == "df":
            return CommandResult(0, f"    Avail     Size\n{vm.avail} {20 * 2**30}\n", "")
        raise AssertionError(f"unexpected command {argv}")

    def stream_root_lines(self, node: SshEndpoint, argv: Sequence[str], *,
                          timeout: float | None = None) -> AsyncIterator[str]:
        raise NotImplementedError

    async def upload(self, node: SshEndpoint, source: AsyncIterable[bytes] | ReplayableSource,
                     remote_path: str, *, progress: object = None) -> UploadResult:
        raise NotImplementedError


@pytest.fixture
def shell() -> FakeShell:
    return FakeShell()


def _ops(shell: FakeShell, events: list[ProgressEvent] | None = None) -> A9sOperations:
    return A9sOperations(shell, NODES, progress=(events.append if events is not None
                                                 else lambda e: None))


async def test_probe_finds_the_primary_and_reports_progress(shell: FakeShell) -> None:
    events: list[ProgressEvent] = []
    view = await _ops(shell, events).probe_nodes()
    assert view.primary == NODES[0]
    assert view.standbys == (NODES[1], NODES[2])
    assert {e.node for e in events} == {"pg/0", "pg/1", "pg/2"}
    assert view.view_of(NODES[1]).monit["postgresql-ha"] == ServiceState.RUNNING.value


async def test_probe_two_primaries(shell: FakeShell) -> None:
    shell.vms["10.77.0.12"].in_recovery = "f"
    with pytest.raises(PrimaryAmbiguous, match="found 2"):
        await _ops(shell).probe_nodes()


async def test_probe_no_primary(shell: FakeShell) -> None:
    shell.vms["10.77.0.10"].pg_up = False
    with pytest.raises(PrimaryAmbiguous, match=r"found 0.*PostgreSQL down"):
        await _ops(shell).probe_nodes()


async def test_probe_repmgr_disagrees(shell: FakeShell) -> None:
    shell.repmgr_rows[0] = _row(0, "standby", "! running as primary")
    with pytest.raises(PrimaryAmbiguous, match="repmgr says"):
        await _ops(shell).probe_nodes()
    shell.repmgr_rows = []
    with pytest.raises(PrimaryAmbiguous, match="no nodes"):
        await _ops(shell).probe_nodes()


async def test_probe_without_repmgr_accepts_only_a_lone_running_primary(
    shell: FakeShell,
) -> None:
    """An earlier recovery interrupted in Restoring: repmgr's database is gone. With the
    standbys stopped (as Staging leaves them) the primary is unambiguous; with a standby
    running, repmgr's word is missing and the probe refuses."""
    shell.repmgr_db_gone = True
    with pytest.raises(PrimaryAmbiguous, match=r"repmgr cannot confirm it .*pg/1"):
        await _ops(shell).probe_nodes()
    shell.vms["10.77.0.11"].pg_up = False
    shell.vms["10.77.0.12"].pg_up = False
    events: list[ProgressEvent] = []
    view = await _ops(shell, events).probe_nodes()
    assert view.primary == NODES[0]
    assert any("repmgr unreadable" in e.message for e in events)


async def test_probe_unreachable_node_fails_the_probe(shell: FakeShell) -> None:
    shell.vms["10.77.0.11"].reachable = False
    with pytest.raises(NodeUnreachable, match="pg/1"):
        await _ops(shell).probe_nodes()
    # nothing but reads were sent
    assert all("stop" not in argv for _, argv, _ in shell.calls)


async def test_free_space(shell: FakeShell) -> None:
    ops = _ops(shell)
    free = await ops.check_free_space(NODES[0], 2**30)
    assert free.available == 10 * 2**30
    with pytest.raises(InsufficientSpace) as err:
        await ops.check_free_space(NODES[0], 11 * 2**30)
    assert str(10 * 2**30) in str(err.value)
    assert str(11 * 2**30) in str(err.value)


def test_space_estimate() -> None:
    assert estimate_needed_bytes(compressed_size=100) == int(100 * 5 * 2 * 1.1)
    assert estimate_needed_bytes(plain_size=1000) == 2200
    assert estimate_needed_bytes(plain_size=1000, already_staged=1000) == 1200
    with pytest.raises(ValueError):
        estimate_needed_bytes()


async def test_standbys_stopped_twice_changes_nothing_the_second_time(shell: FakeShell) -> None:
    ops = _ops(shell)
    view = await ops.probe_nodes()
    first = await ops.ensure_standbys_stopped(view)
    assert first.changed
    stops = [c for c in shell.calls if c[1][-2:-1] == ["stop"]]
    assert {c[0] for c in stops} == {"10.77.0.11", "10.77.0.12"}
    assert all(c[1][0] == "/var/vcap/bosh/bin/monit" for c in stops)
    shell.calls.clear()
    second = await ops.ensure_standbys_stopped(view)
    assert not second.changed
    assert not [c for c in shell.calls if c[1][-2:-1] == ["stop"]]
    assert shell.vms["10.77.0.10"].monit["postgresql-ha"] == "OK"


async def test_inactive_slots_dropped_idempotent(shell: FakeShell) -> None:
    shell.vms["10.77.0.10"].inactive_slots = 2
    ops = _ops(shell)
    view = await ops.probe_nodes()
    assert (await ops.ensure_inactive_slots_dropped(view)).changed
    assert not (await ops.ensure_inactive_slots_dropped(view)).changed


async def test_monit_wait_times_out_with_the_laggard(shell: FakeShell) -> None:
    shell.vms["10.77.0.11"].monit["postgresql-ha"] = "Execution failed"
    with pytest.raises(NotReadyYet, match="postgresql-ha is 'Execution failed'"):
        await wait_for(shell, NODES[1], A9sLayout(),
                       {"postgresql-ha": ServiceState.RUNNING}, timeout=0, interval=0)
