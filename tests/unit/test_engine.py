"""Unit tests of the phase machine, the status functions, the step runner and the supervisor.

Fakes only: steps are in-memory objects that count their calls. The end-to-end proof that the
same machinery works under kopf against an API server is in tests/e2e.
"""

from __future__ import annotations

import asyncio
import copy
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from pgrecovery.engine import lifecycle
from pgrecovery.engine import status as st
from pgrecovery.engine.phases import NEXT_PHASE, WORKING_PHASES, Phase, next_phase
from pgrecovery.engine.plan import Plan, PlanInputs
from pgrecovery.engine.spec import parse_spec
from pgrecovery.engine.status import ConditionType, RecoveryStatus, StepState
from pgrecovery.engine.steps import StepContext, StepEventKind, run_step
from pgrecovery.engine.supervisor import (
    MemoryReporter,
    OutcomeKind,
    RetryPolicy,
    Supervisor,
    execute_phase,
)
from pgrecovery.errors import BackupNotFound, NodeUnreachable, RemoteCommandFailed

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def raw_spec(**changes: Any) -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "manifests/samples/pgrecovery-s3.yaml").read_text())
    spec: dict[str, Any] = copy.deepcopy(doc["spec"])
    spec.update(changes)
    return spec


@dataclass
class CountingStep:
    """Holds after `apply` ran once (or from the start when `holds`); counts calls."""

    name: str
    holds: bool = False
    fail_with: Exception | None = None
    applies: int = 0
    checks: int = 0

    async def check(self, ctx: StepContext) -> bool:
        self.checks += 1
        return self.holds

    async def apply(self, ctx: StepContext) -> None:
        self.applies += 1
        if self.fail_with is not None:
            raise self.fail_with
        await ctx.progress(10, 10, "done")
        self.holds = True


def ctx_for(status: RecoveryStatus) -> tuple[StepContext, MemoryReporter]:
    reporter = MemoryReporter(status)
    return StepContext(reporter=reporter), reporter


# --------------------------------------------------------------------------- phases


def test_transition_table_walks_every_working_phase_once() -> None:
    walk, phase = [], Phase.PENDING
    while (following := next_phase(phase)) is not None:
        walk.append(following)
        phase = following
    assert walk == list(WORKING_PHASES)
    assert Phase.FAILED not in NEXT_PHASE


# --------------------------------------------------------------------------- status


def test_conditions_move_transition_time_only_on_change() -> None:
    t0 = st.now_utc()
    s = st.set_condition(RecoveryStatus(), ConditionType.PROGRESSING, True, "A", "", t0)
    s = st.set_condition(s, ConditionType.PROGRESSING, True, "B", "x", t0 + timedelta(seconds=5))
    cond = s.condition(ConditionType.PROGRESSING)
    assert cond is not None
    assert cond.last_transition_time == t0
    assert cond.reason == "B"
    s = st.set_condition(s, ConditionType.PROGRESSING, False, "C", "", t0 + timedelta(seconds=9))
    cond = s.condition(ConditionType.PROGRESSING)
    assert cond is not None
    assert cond.last_transition_time == t0 + timedelta(seconds=9)


def test_stalled_turns_true_without_progress_and_clears_with_progress() -> None:
    t0 = st.now_utc()
    s = st.enter_phase(RecoveryStatus(), Phase.FETCHING, t0)
    assert not st.check_stalled(s, t0 + timedelta(seconds=10), 60).is_true(ConditionType.STALLED)
    stalled = st.check_stalled(s, t0 + timedelta(seconds=61), 60)
    assert stalled.is_true(ConditionType.STALLED)
    resumed = st.record_progress(stalled, 5, 10, t0 + timedelta(seconds=62))
    assert not resumed.is_true(ConditionType.STALLED)
    assert resumed.progress.percent == 50


def test_fail_records_phase_reason_and_conditions() -> None:
    t0 = st.now_utc()
    s = st.enter_phase(RecoveryStatus(), Phase.STAGING, t0)
    s = st.fail(s, "WrongKey", "bad key", t0)
    assert s.phase is Phase.FAILED
    assert s.failure_reason == "WrongKey"
    assert s.facts["failedInPhase"] == "Staging"
    assert s.is_true(ConditionType.FAILED)
    assert not s.is_true(ConditionType.PROGRESSING)
    assert s.finished


def test_status_round_trips_through_the_wire_shape() -> None:
    t0 = st.now_utc()
    s = st.accept(RecoveryStatus(), {"a": 1}, 3, t0)
    s = st.step_started(s, "ensure-x", t0)
    s = st.step_finished(s, "ensure-x", t0)
    wire = s.to_dict()
    assert wire["phase"] == "Fetching"
    assert wire["observedGeneration"] == 3
    assert wire["steps"][0]["state"] == "Succeeded"
    assert RecoveryStatus.from_dict(wire) == s


def test_a_finished_step_records_its_duration_to_a_tenth_of_a_second() -> None:
    t0 = st.step_clock()
    assert t0.microsecond % 1000 == 0
    s = st.step_started(RecoveryStatus(), "ensure-x", t0)
    s = st.step_finished(s, "ensure-x", t0 + timedelta(seconds=2, milliseconds=345))
    record = s.step("ensure-x")
    assert record is not None
    assert record.seconds == 2.3
    wire = s.to_dict()["steps"][0]
    assert wire["seconds"] == 2.3
    assert "." in wire["finishedAt"]  # sub-second times survive the wire shape
    assert RecoveryStatus.from_dict(s.to_dict()) == s


# --------------------------------------------------------------------------- lifecycle


def test_invalid_spec_fails_before_the_first_phase_naming_the_field() -> None:
    bad = raw_spec()
    bad["target"]["nodes"][0]["address"] = "10.0.0.1; rm -rf /"
    s = lifecycle.accept_or_reject(bad, RecoveryStatus(), 1)
    assert s.phase is Phase.FAILED
    assert s.failure_reason == "InvalidSpec"
    assert "spec.target.nodes.0.address" in s.message
    assert not any(step for step in s.steps)


def test_accepted_spec_is_frozen_except_confirm() -> None:
    s = lifecycle.accept_or_reject(raw_spec(confirm=""), RecoveryStatus(), 1)
    assert s.phase is Phase.FETCHING
    assert lifecycle.accept_or_reject(raw_spec(), s, 1) == s  # never accepted twice
    edited = raw_spec(confirm="a9s-pg")
    edited["target"]["deployment"] = "other"
    spec = lifecycle.effective_spec(edited, s)
    assert spec.target.deployment == "a9s-pg"  # the edit is ignored …
    assert spec.confirm == "a9s-pg"  # … but confirm is honoured
    noted = lifecycle.spec_change(edited, s, 2)
    assert noted.is_true(ConditionType.SPEC_CHANGE_IGNORED)
    only_confirm = lifecycle.spec_change(raw_spec(confirm="a9s-pg"), s, 2)
    assert not only_confirm.is_true(ConditionType.SPEC_CHANGE_IGNORED)
    assert only_confirm.observed_generation == 2


# --------------------------------------------------------------------------- steps


async def test_step_runs_check_apply_check_and_twice_changes_nothing() -> None:
    step = CountingStep("ensure-thing")
    ctx, reporter = ctx_for(st.enter_phase(RecoveryStatus(), Phase.STAGING, st.now_utc()))
    await run_step(step, ctx)
    assert (step.checks, step.applies) == (2, 1)
    record = reporter.status.step("ensure-thing")
    assert record is not None
    assert record.state is StepState.SUCCEEDED
    kinds = [e.kind for e in reporter.drain()]
    assert kinds == [StepEventKind.STARTED, StepEventKind.FINISHED]
    await run_step(step, ctx)  # second run: check holds, nothing applied, no new events
    assert step.applies == 1
    assert reporter.drain() == []


async def test_step_that_does_not_take_effect_fails() -> None:
    class Ineffective(CountingStep):
        async def apply(self, ctx: StepContext) -> None:
            self.applies += 1

    ctx, reporter = ctx_for(st.enter_phase(RecoveryStatus(), Phase.STAGING, st.now_utc()))
    with pytest.raises(Exception, match="does not hold"):
        await run_step(Ineffective("ensure-nothing"), ctx)
    record = reporter.status.step("ensure-nothing")
    assert record is not None
    assert record.state is StepState.FAILED


# --------------------------------------------------------------------------- execute_phase


def plan_of(**phases: list[CountingStep]) -> Plan:
    return Plan(steps={Phase(name): steps for name, steps in phases.items()})


async def test_phase_advances_and_resumes_skipping_done_steps() -> None:
    spec = parse_spec(raw_spec())
    done, todo = CountingStep("a", holds=True), CountingStep("b")
    ctx, reporter = ctx_for(st.enter_phase(RecoveryStatus(), Phase.FETCHING, st.now_utc()))
    outcome = await execute_phase(
        Phase.FETCHING, plan_of(Fetching=[done, todo]), ctx, RetryPolicy(), spec
    )
    assert outcome.kind is OutcomeKind.ADVANCED
    assert outcome.status.phase is Phase.DECRYPTING
    assert (done.applies, todo.applies) == (0, 1)
    kinds = [(e.step, e.kind) for e in reporter.drain()]
    assert ("a", StepEventKind.SKIPPED) in kinds


async def test_fatal_error_fails_with_reason_and_keeps_step_records() -> None:
    spec = parse_spec(raw_spec())
    failing = CountingStep("find-backup", fail_with=BackupNotFound("no backup for GUID x"))
    ctx, _ = ctx_for(st.enter_phase(RecoveryStatus(), Phase.FETCHING, st.now_utc()))
    outcome = await execute_phase(
        Phase.FETCHING, plan_of(Fetching=[failing]), ctx, RetryPolicy(), spec
    )
    assert outcome.kind is OutcomeKind.FAILED
    assert outcome.status.failure_reason == "BackupNotFound"
    assert "no backup for GUID x" in outcome.status.message
    record = outcome.status.step("find-backup")
    assert record is not None
    assert record.state is StepState.FAILED


async def test_a_failure_past_the_point_of_no_return_says_the_state_and_what_to_do() -> None:
    """The message names in words what the finished destructive steps did and the step that
    may have run in part, says a new PgRecovery continues, and status.nodes is refreshed."""
    spec = parse_spec(raw_spec())
    done = CountingStep("ensure-standbys-stopped")
    failing = CountingStep("ensure-connections-blocked",
                           fail_with=RemoteCommandFailed("pg/0: exit 1 from sudo -n …"))
    status = st.enter_phase(RecoveryStatus(), Phase.STAGING, st.now_utc())
    status = st.set_nodes(status, (st.NodeState(name="pg/1", role="standby", state="running"),))
    ctx, _ = ctx_for(status)

    async def observed() -> list[st.NodeState]:
        return [st.NodeState(name="pg/1", role="standby", state="postgres-down")]

    plan = Plan(steps={Phase.STAGING: [done, failing]},
                state_words={"ensure-standbys-stopped": "standbys stopped"},
                observe_nodes=observed)
    outcome = await execute_phase(Phase.STAGING, plan, ctx, RetryPolicy(), spec)
    message = outcome.status.message
    assert "pg/0: exit 1 from sudo" in message
    assert "The cluster is left with: standbys stopped; ensure-connections-blocked may have " \
           "run in part. Create a new PgRecovery for this deployment" in message, message
    assert [n.state for n in outcome.status.nodes] == ["postgres-down"]
    # Before the point of no return: no such words (nothing was changed).
    ctx, _ = ctx_for(st.enter_phase(RecoveryStatus(), Phase.FETCHING, st.now_utc()))
    early = await execute_phase(Phase.FETCHING, plan_of(Fetching=[CountingStep(
        "x", fail_with=BackupNotFound("gone"))]), ctx, RetryPolicy(), spec)
    assert "The cluster is left" not in early.status.message


async def test_retryable_error_retries_then_gives_up() -> None:
    spec = parse_spec(raw_spec())
    flaky = CountingStep("reach-nodes", fail_with=NodeUnreachable("pg/1 timed out"))
    status = st.enter_phase(RecoveryStatus(), Phase.FETCHING, st.now_utc())
    policy = RetryPolicy(limit=2, base_delay=1, max_delay=10)
    kinds = []
    for _ in range(3):
        ctx, _r = ctx_for(status)
        outcome = await execute_phase(Phase.FETCHING, plan_of(Fetching=[flaky]), ctx, policy, spec)
        kinds.append(outcome.kind)
        status = outcome.status
    assert kinds == [OutcomeKind.RETRYING, OutcomeKind.RETRYING, OutcomeKind.FAILED]
    assert status.failure_reason == "NodeUnreachable"


async def test_dry_run_stops_before_the_first_destructive_phase() -> None:
    spec = parse_spec(raw_spec(dryRun=True))
    ctx, _ = ctx_for(st.enter_phase(RecoveryStatus(), Phase.DECRYPTING, st.now_utc()))
    outcome = await execute_phase(
        Phase.DECRYPTING, plan_of(Decrypting=[CountingStep("x")]), ctx, RetryPolicy(), spec
    )
    assert outcome.kind is OutcomeKind.DRY_RUN_DONE
    assert outcome.status.phase is Phase.DECRYPTING
    assert outcome.status.finished


# --------------------------------------------------------------------------- supervisor


def inputs_for(spec_raw: dict[str, Any]) -> PlanInputs:
    return PlanInputs(
        name="r",
        namespace="ns",
        uid="u1",
        spec=parse_spec(spec_raw),
        secrets=None,  # type: ignore[arg-type]
        work_dir="/nonexistent",
    )


async def test_supervisor_blocks_destructive_phase_until_confirmed() -> None:
    staged = CountingStep("ensure-standbys-stopped")

    async def factory(_inputs: PlanInputs) -> Plan:
        return plan_of(Staging=[staged])

    sup = Supervisor(
        factory, poll_interval=0.01, stall_after=60, gate_recheck=0.01, retry=RetryPolicy()
    )
    status = st.enter_phase(RecoveryStatus(), Phase.STAGING, st.now_utc())
    blocked = await sup.poll("u1", Phase.STAGING, status, lambda: inputs_for(raw_spec(confirm="")))
    assert blocked.kind is OutcomeKind.BLOCKED
    assert blocked.status.condition(ConditionType.BLOCKED).reason == "AwaitingConfirmation"  # type: ignore[union-attr]
    assert staged.applies == 0
    outcome = blocked
    for _ in range(100):
        outcome = await sup.poll(
            "u1", Phase.STAGING, outcome.status, lambda: inputs_for(raw_spec())
        )
        if not outcome.again:
            break
        await asyncio.sleep(0.01)
    assert outcome.kind is OutcomeKind.ADVANCED
    assert staged.applies == 1
    assert not outcome.status.is_true(ConditionType.BLOCKED)
    await sup.close()


async def test_supervisor_cancel_stops_at_a_safe_point() -> None:
    release = asyncio.Event()

    class Slow(CountingStep):
        async def apply(self, ctx: StepContext) -> None:
            await release.wait()
            ctx.raise_if_cancelled()

    async def factory(_inputs: PlanInputs) -> Plan:
        return plan_of(Fetching=[Slow("download-parts"), CountingStep("never")])

    sup = Supervisor(
        factory, poll_interval=0.01, stall_after=60, gate_recheck=0.01, retry=RetryPolicy()
    )
    status = st.enter_phase(RecoveryStatus(), Phase.FETCHING, st.now_utc())
    first = await sup.poll("u1", Phase.FETCHING, status, lambda: inputs_for(raw_spec()))
    assert first.kind is OutcomeKind.RUNNING
    await asyncio.sleep(0.05)
    cancelling = asyncio.create_task(sup.cancel("u1", timeout=5))
    await asyncio.sleep(0.05)
    release.set()
    final = await cancelling
    assert final is not None
    record = final.step("download-parts")
    assert record is not None
    assert record.state is StepState.FAILED
    assert final.step("never") is None
    assert not sup.running("u1")
