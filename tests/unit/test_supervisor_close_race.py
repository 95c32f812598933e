"""The supervisor's close race: a phase's final status (Failed, Succeeded, the next phase) is
set before the phase task closes its plan (SSH connections, object-store clients); a poll in that
window must still report the running phase, and the final status comes with the outcome once the
task is done.

Why it matters (seen in tests/e2e/test_bad_input_matrix.py, 2 of 4 runs on a loaded machine,
before `MemoryReporter.live`): a Running report carrying the final status made the handler
write it; kopf then called the handler again, which returned at once because
`status.finished` (or the phase changed) — so the outcome was never reported: no Warning Event
with the failure reason (or no `Phase<Next>`/`Succeeded` Event), no
`pgrecovery_recoveries_total`/`failures_total` sample, no `claims.release` (the deployment
stayed claimed in this operator process, so a second recovery of that deployment waited
DeploymentBusy until the operator restarted), and the `_runs` entry was never removed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from pgrecovery.engine import status as st
from pgrecovery.engine.phases import Phase
from pgrecovery.engine.plan import Plan, PlanInputs
from pgrecovery.engine.status import RecoveryStatus
from pgrecovery.engine.supervisor import OutcomeKind, RetryPolicy, Supervisor
from pgrecovery.errors import BackupNotFound
from tests.unit.test_engine import CountingStep, inputs_for, raw_spec

pytestmark = pytest.mark.unit


def _plan_factory(
    steps: list[CountingStep], closing: asyncio.Event, release: asyncio.Event
) -> Callable[[PlanInputs], Awaitable[Plan]]:
    async def slow_close() -> None:  # like SshPool.close(): waits for the peers
        closing.set()
        await release.wait()

    async def factory(_inputs: PlanInputs) -> Plan:
        return Plan(steps={Phase.FETCHING: steps}, closers=[slow_close])

    return factory


@pytest.mark.parametrize(
    ("step", "final_kind", "final_phase"),
    [
        (CountingStep("resolve-backup", fail_with=BackupNotFound("no backup")),
         OutcomeKind.FAILED, Phase.FAILED),
        (CountingStep("resolve-backup"), OutcomeKind.ADVANCED, Phase.DECRYPTING),
    ],
    ids=["failed", "advanced"],
)
async def test_a_running_report_never_carries_the_final_status(
    step: CountingStep, final_kind: OutcomeKind, final_phase: Phase
) -> None:
    closing = asyncio.Event()
    release = asyncio.Event()
    sup = Supervisor(
        _plan_factory([step], closing, release),
        poll_interval=0.01, stall_after=60, gate_recheck=0.01, retry=RetryPolicy(),
    )
    status = st.enter_phase(RecoveryStatus(), Phase.FETCHING, st.now_utc())
    first = await sup.poll("u1", Phase.FETCHING, status, lambda: inputs_for(raw_spec()))
    assert first.kind is OutcomeKind.RUNNING
    await asyncio.wait_for(closing.wait(), 5)  # the step ended; the plan is closing

    try:
        during_close = await sup.poll("u1", Phase.FETCHING, first.status,
                                      lambda: inputs_for(raw_spec()))
        # A RUNNING report still describes the running phase ...
        assert during_close.kind is OutcomeKind.RUNNING
        assert during_close.status.phase is Phase.FETCHING
        assert not during_close.status.finished
        assert sup.running("u1")

        # ... and the outcome, with the final status, follows once the plan is closed.
        release.set()
        for _ in range(100):
            if not sup.running("u1"):
                break
            await asyncio.sleep(0.01)
        after = await sup.poll("u1", Phase.FETCHING, during_close.status,
                               lambda: inputs_for(raw_spec()))
        assert after.kind is final_kind
        assert after.status.phase is final_phase
        assert not sup.running("u1")
    finally:
        release.set()
        await sup.close()
