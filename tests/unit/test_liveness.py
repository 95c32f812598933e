"""The liveness verdict (pgrecovery/liveness.py): a blocked event loop and a dead watch.

The blocked loop is proven on a real operator in tests/e2e/test_operator_liveness.py; here the
verdict's rules with a fake clock, and the dead watch with a real Supervisor: a running phase
that kopf stops polling (as when its watch no longer delivers the object's touch patches) turns
the verdict unhealthy, and a poll turns it healthy again.
"""

from __future__ import annotations

import asyncio

import pytest

from pgrecovery.engine import status as st
from pgrecovery.engine.phases import Phase
from pgrecovery.engine.plan import Plan, PlanInputs
from pgrecovery.engine.status import RecoveryStatus
from pgrecovery.engine.steps import StepContext
from pgrecovery.engine.supervisor import OutcomeKind, RetryPolicy, Supervisor
from pgrecovery.liveness import LOOP_STALL_AFTER, Liveness
from tests.unit.test_engine import inputs_for, raw_spec

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_blocked_loop_fails_after_the_limit_and_recovers_with_the_next_beat() -> None:
    clock = Clock()
    liveness = Liveness(lambda _limit: [], clock=clock)
    assert liveness.verdict() == (True, "ok")
    clock.now += LOOP_STALL_AFTER - 1  # a slow moment is no fault
    assert liveness.verdict()[0]
    clock.now += 2
    healthy, why = liveness.verdict()
    assert not healthy
    assert why.startswith("event loop blocked: no heartbeat for 16s")
    liveness.beat()
    assert liveness.verdict() == (True, "ok")


def test_overdue_polls_are_a_dead_watch() -> None:
    overdue: list[str] = []
    limits: list[float] = []

    def find(limit: float) -> list[str]:
        limits.append(limit)
        return list(overdue)

    liveness = Liveness(find, poll_overdue_after=120, clock=Clock())
    liveness.beat()
    assert liveness.verdict()[0]
    overdue.append("uid-1")
    liveness.beat()
    healthy, why = liveness.verdict()
    assert not healthy
    assert why == "watch dead: running recoveries not polled for more than 120s: uid-1"
    assert limits == [120, 120]


class HoldingStep:
    """Runs until released: a phase at work."""

    name = "hold"

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def check(self, ctx: StepContext) -> bool:
        return self.release.is_set()

    async def apply(self, ctx: StepContext) -> None:
        await self.release.wait()


async def test_a_running_phase_kopf_stops_polling_makes_the_verdict_unhealthy() -> None:
    step = HoldingStep()

    async def factory(_inputs: PlanInputs) -> Plan:
        return Plan(steps={Phase.FETCHING: [step]})

    sup = Supervisor(factory, poll_interval=0.01, stall_after=60, gate_recheck=0.01,
                     retry=RetryPolicy())
    liveness = Liveness(sup.overdue, poll_overdue_after=0.2)
    status = st.enter_phase(RecoveryStatus(), Phase.FETCHING, st.now_utc())
    try:
        first = await sup.poll("u1", Phase.FETCHING, status, lambda: inputs_for(raw_spec()))
        assert first.kind is OutcomeKind.RUNNING
        liveness.beat()
        assert liveness.verdict() == (True, "ok")
        await asyncio.sleep(0.3)  # no poll: the watch brought nothing
        liveness.beat()
        healthy, why = liveness.verdict()
        assert not healthy
        assert why.startswith("watch dead")
        assert why.endswith(": u1")
        # kopf polls again (the watch is back): healthy.
        again = await sup.poll("u1", Phase.FETCHING, first.status, lambda: inputs_for(raw_spec()))
        assert again.kind is OutcomeKind.RUNNING
        liveness.beat()
        assert liveness.verdict() == (True, "ok")
        # A finished and reported phase is no longer expected to be polled.
        step.release.set()
        while sup.running("u1"):
            await asyncio.sleep(0.01)
        done = await sup.poll("u1", Phase.FETCHING, again.status, lambda: inputs_for(raw_spec()))
        assert done.kind is OutcomeKind.ADVANCED
        await asyncio.sleep(0.3)
        liveness.beat()
        assert liveness.verdict() == (True, "ok")
    finally:
        step.release.set()
        await sup.close()


async def test_the_heartbeat_task_beats_on_the_loop() -> None:
    liveness = Liveness(lambda _limit: [], beat_interval=0.01, loop_stall_after=0.05)
    task = asyncio.create_task(liveness.run())
    try:
        await asyncio.sleep(0.1)
        assert liveness.verdict() == (True, "ok")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await asyncio.sleep(0.1)  # the loop runs, but nothing beats: as if it were blocked
    assert not liveness.verdict()[0]
