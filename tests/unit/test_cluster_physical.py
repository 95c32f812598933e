"""Physical-restore decisions with a fake remote shell (cluster/physical.py).

The effects on real VMs (data directory replaced, base backup unpacked, replay, promotion) are
proven in tests/integration/test_wale_pitr.py; here: the space decision, the recovery settings
text, replay-state parsing, a server that dies in recovery, and the journal that makes the
destructive steps run once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Callable, Sequence
from datetime import UTC, datetime

import pytest

from pgrecovery.adapters.ssh import CommandResult, SshEndpoint
from pgrecovery.cluster import physical
from pgrecovery.cluster.nodes import A9sLayout, Node
from pgrecovery.cluster.physical import (
    PhysicalOperations,
    ReplayState,
    recovery_block,
    replay_fatal_lines,
)
from pgrecovery.errors import InsufficientSpace, InvalidSpec, RemoteCommandFailed, RestoreFailed

pytestmark = pytest.mark.unit

PRIMARY = Node("pg/0", "10.77.0.10")
RUN = "pitr-1234abcd-000000010000000000000002"


class FakeShell:
    """Answers by the script's first distinctive words; records every call."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.inputs: list[str | None] = []
        self.df_du = "1000\n400\n"
        self.journal: set[str] = set()
        self.psql: Callable[[], CommandResult] = lambda: CommandResult(0, "t,0/3000060,,1\n", "")
        self.log = ""

    async def run_root(self, node: SshEndpoint, argv: Sequence[str], *,
                       input: bytes | str | None = None, timeout: float | None = None,
                       check: bool = True) -> CommandResult:
        argv = list(argv)
        self.calls.append(argv)
        self.inputs.append(input.decode() if isinstance(input, bytes) else input)
        res = self._answer(argv)
        if check and res.exit_status:
            raise RemoteCommandFailed("failed", exit_status=res.exit_status, stderr=res.stderr)
        return res

    def _answer(self, argv: list[str]) -> CommandResult:
        joined = " ".join(argv)
        if argv[0] == "test":
            return CommandResult(0 if argv[-1] in self.journal else 1, "", "")
        if "date -u" in joined:
            self.journal.add(f"{argv[-2]}/{argv[-1]}")
            return CommandResult(0, "", "")
        if "df -B1" in joined:
            return CommandResult(0, self.df_du, "")
        if "psql" in joined:
            return self.psql()
        if argv[0] == "tail":
            return CommandResult(0, self.log, "")
        return CommandResult(0, "", "")

    def stream_root_lines(self, node: SshEndpoint, argv: Sequence[str], *,
                          timeout: float | None = None) -> AsyncIterable[str]:
        raise NotImplementedError

    async def upload(self, *args: object, **kwargs: object) -> object:
        raise NotImplementedError


async def _no_pipe(node: Node, argv: Sequence[str], chunks: AsyncIterable[bytes],
                   on_bytes: Callable[[int], None]) -> object:
    total = 0
    async for chunk in chunks:
        total += len(chunk)
        on_bytes(total)
    return total


def _ops(shell: FakeShell) -> PhysicalOperations:
    return PhysicalOperations(shell, _no_pipe, layout=A9sLayout())  # type: ignore[arg-type]


def test_space_plan_keeps_the_old_data_when_there_is_room_else_wipes_else_refuses() -> None:
    shell = FakeShell()
    ops = _ops(shell)
    shell.df_du = "1000\n400\n"
    assert asyncio.run(ops.space_plan(PRIMARY, 900)).keep_old is True  # 990 <= 1000
    shell.df_du = "800\n400\n"
    wipe = asyncio.run(ops.space_plan(PRIMARY, 900))
    assert wipe.keep_old is False
    assert "wiped" in wipe.describe()
    shell.df_du = "500\n400\n"
    with pytest.raises(InsufficientSpace, match="500 bytes free and the old data directory "
                                                "holds 400; the restore needs about 990"):
        asyncio.run(ops.space_plan(PRIMARY, 900))
    # Wiping would make room, but the staged WAL must fit before the wipe.
    shell.df_du = "300\n4000\n"
    assert asyncio.run(ops.space_plan(PRIMARY, 900, 200)).keep_old is False
    with pytest.raises(InsufficientSpace, match="330 of them before the old data can be wiped"):
        asyncio.run(ops.space_plan(PRIMARY, 900, 300))
    shell.df_du = "garbage"
    with pytest.raises(RemoteCommandFailed, match="unexpected df/du output"):
        asyncio.run(ops.space_plan(PRIMARY, 900))


def test_recovery_settings_with_and_without_a_target() -> None:
    wal = "/var/vcap/store/pgrecovery/wal/" + RUN
    block = recovery_block(wal, datetime(2026, 11, 21, 10, 0, 5, 123456, tzinfo=UTC))
    assert f"restore_command = 'cp {wal}/%f \"%p\"'" in block
    assert "recovery_target_time = '2026-11-21 10:00:05.123456+00'" in block
    assert "recovery_target_action = 'promote'" in block
    assert block.startswith(physical.BLOCK_BEGIN)
    assert block.rstrip().endswith(physical.BLOCK_END)
    to_end = recovery_block(wal, None)
    assert "recovery_target_time =" not in to_end
    assert "recovery_target_action" not in to_end
    assert "recovery_target_timeline = 'latest'" in to_end


def test_paths_come_from_a_validated_run_id() -> None:
    ops = _ops(FakeShell())
    assert ops.wal_dir(RUN) == f"/var/vcap/store/pgrecovery/wal/{RUN}"
    assert ops.old_data_dir(RUN) == f"/var/vcap/store/postgresql15.pgrecovery-old-{RUN}"
    with pytest.raises(InvalidSpec):
        ops.wal_dir("x; rm -rf /")


def test_replay_state_parsing() -> None:
    shell = FakeShell()
    ops = _ops(shell)
    shell.psql = lambda: CommandResult(
        0, "f,0/5000150,2026-11-21 10:00:04.5+00,3\n", "")
    state = asyncio.run(ops.replay_state(PRIMARY))
    assert state == ReplayState(False, 0x5000150, datetime(2026, 11, 21, 10, 0, 4, 500000,
                                                           tzinfo=UTC), 3)
    shell.psql = lambda: CommandResult(0, "t,,,\n", "")
    assert asyncio.run(ops.replay_state(PRIMARY)).replay_lsn is None


def test_a_server_that_dies_in_recovery_fails_with_its_fatal_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shell = FakeShell()
    ops = _ops(shell)

    def down() -> CommandResult:
        return CommandResult(2, "", 'psql: error: connection to server on socket failed')

    shell.psql = down
    shell.log = ("LOG:  starting point-in-time recovery\n"
                 "FATAL:  recovery ended before configured recovery target was reached\n")
    monkeypatch.setattr(physical, "REPLAY_POLL_INTERVAL", 0.01)
    clock = iter(range(0, 10_000, 6))
    monkeypatch.setattr(physical.time, "monotonic", lambda: float(next(clock)))
    seen: list[ReplayState] = []

    async def on_state(state: ReplayState) -> None:
        seen.append(state)

    with pytest.raises(RestoreFailed, match="recovery ended before configured recovery target"):
        asyncio.run(ops.wait_promoted(PRIMARY, on_state=on_state, timeout=600))
    assert seen == []


def test_wait_promoted_reports_progress_until_promotion() -> None:
    shell = FakeShell()
    ops = _ops(shell)
    answers = iter(["t,0/3000060,,1\n", "t,0/4000000,2026-11-21 10:00:01+00,1\n",
                    "f,0/4000100,2026-11-21 10:00:02+00,2\n"])
    shell.psql = lambda: CommandResult(0, next(answers), "")
    seen: list[ReplayState] = []

    async def on_state(state: ReplayState) -> None:
        seen.append(state)

    physical.REPLAY_POLL_INTERVAL, saved = 0.0, physical.REPLAY_POLL_INTERVAL
    try:
        final = asyncio.run(ops.wait_promoted(PRIMARY, on_state=on_state, timeout=600))
    finally:
        physical.REPLAY_POLL_INTERVAL = saved
    assert [s.in_recovery for s in seen] == [True, True, False]
    assert final.timeline == 2
    assert final.last_xact_time == datetime(2026, 11, 21, 10, 0, 2, tzinfo=UTC)


def test_destructive_steps_run_once_per_run() -> None:
    shell = FakeShell()
    ops = _ops(shell)
    first = asyncio.run(ops.ensure_data_dir_replaced(PRIMARY, RUN, keep_old=True))
    assert first.changed
    moves = [c for c in shell.calls if c[0] == "bash" and "keep" in c]
    assert len(moves) == 1
    assert moves[0][-5:] == ["keep", *physical.CONFIG_FILES]
    assert moves[0][-6] == f"/var/vcap/store/postgresql15.pgrecovery-old-{RUN}"
    again = asyncio.run(ops.ensure_data_dir_replaced(PRIMARY, RUN, keep_old=True))
    assert not again.changed
    assert len([c for c in shell.calls if c[0] == "bash" and "keep" in c]) == 1

    async def chunks() -> AsyncIterable[bytes]:
        yield b"tar bytes"

    got: list[int] = []
    one = asyncio.run(ops.ensure_partition_extracted(PRIMARY, RUN, 0, chunks(), got.append))
    assert one.changed
    assert got == [9]
    two = asyncio.run(ops.ensure_partition_extracted(PRIMARY, RUN, 0, chunks(), got.append))
    assert not two.changed
    assert got == [9]


def test_replay_fatal_lines_only_from_the_latest_start_and_not_our_refused_polls() -> None:
    tail = "\n".join([
        "2026-11-21 10:00:00 UTC LOG:  starting PostgreSQL 15.8",
        "2026-11-21 10:00:01 UTC FATAL:  terminating connection due to administrator command",
        "2026-11-21 10:00:02 UTC FATAL:  could not open file \"old\": No such file",
        "2026-11-21 10:01:00 UTC LOG:  starting PostgreSQL 15.8",
        "2026-11-21 10:01:01 UTC FATAL:  the database system is starting up",
        "2026-11-21 10:01:01 UTC FATAL:  the database system is not yet accepting connections",
        "2026-11-21 10:01:02 UTC FATAL:  recovery ended before configured recovery target "
        "was reached",
    ])
    assert replay_fatal_lines(tail) == [
        "2026-11-21 10:01:02 UTC FATAL:  recovery ended before configured recovery target "
        "was reached"
    ]
    assert replay_fatal_lines("LOG:  redo starts\nLOG:  consistent recovery state") == []
    # no start line in the tail: every line counts
    assert replay_fatal_lines("PANIC:  could not locate a valid checkpoint record") == [
        "PANIC:  could not locate a valid checkpoint record"
    ]
