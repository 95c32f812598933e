"""Start / poll / cancel of phase work, for callers that must never block (kopf handlers).

Why this module exists: a phase can take an hour (download, psql restore), but a kopf handler
must return quickly and report progress every few seconds. The supervisor runs a phase's steps
as a background task per recovery and hands back, on each poll, the latest status and the step
events since the last poll. The handler patches that status, posts the events, and asks kopf to
call it again (a temporary error with a delay) until the outcome is known. After an operator
restart the task is gone; the next poll starts the phase again and idempotent steps skip what is
already done. The local runner (`pgrecovery recover`) uses `execute_phase` directly.

Gates live here too, because they decide *whether* the next phase may start: `dryRun` stops
before the first destructive phase, and destructive phases wait for `spec.confirm`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum

from pgrecovery.engine import status as st
from pgrecovery.engine.breakpoints import NO_BREAKPOINTS, Breakpoints
from pgrecovery.engine.phases import Phase, is_destructive, next_phase
from pgrecovery.engine.plan import Plan, PlanFactory, PlanInputs
from pgrecovery.engine.spec import RecoverySpec
from pgrecovery.engine.status import ConditionType, RecoveryStatus, StepState
from pgrecovery.engine.steps import StatusChange, StepContext, StepEvent, run_steps
from pgrecovery.errors import Cancelled, FatalError, RecoveryError, RetryableError

log = logging.getLogger(__name__)


class OutcomeKind(StrEnum):
    RUNNING = "Running"  # work continues; poll again after `delay`
    ADVANCED = "Advanced"  # the phase finished; status.phase is the next phase
    SUCCEEDED = "Succeeded"  # Rejoined finished; the recovery is complete
    FAILED = "Failed"  # fatal; status is Failed
    RETRYING = "Retrying"  # a retryable error; the phase runs again after `delay`
    BLOCKED = "Blocked"  # waiting for a person (confirm) or another recovery; poll again
    DRY_RUN_DONE = "DryRunDone"  # dryRun stopped before the first destructive phase
    CANCELLED = "Cancelled"  # the resource was deleted; stopped at a safe point


@dataclass
class Outcome:
    kind: OutcomeKind
    status: RecoveryStatus
    delay: float = 0.0
    events: list[StepEvent] = field(default_factory=list)

    @property
    def again(self) -> bool:
        """The caller must poll again after `delay`."""
        return self.kind in (OutcomeKind.RUNNING, OutcomeKind.RETRYING, OutcomeKind.BLOCKED)


class MemoryReporter:
    """Keeps the latest status and the step events in memory until the next poll drains them.

    It also keeps the latest status that still describes the running phase (`live`): the
    phase's last change (Failed, Succeeded, the next phase) is made before the plan is closed,
    and until the task has ended only `live` may be handed out — a final status in a Running
    report would make the handler stop polling and lose the outcome (its Event, metric and the
    deployment claim's release).
    """

    def __init__(self, status: RecoveryStatus) -> None:
        self._status = status
        self._phase = status.phase
        self._live = status
        self._live_version = 0
        self._events: list[StepEvent] = []
        # Durability: every update has a number; each poll hands the status out (the handler
        # patches it), and kopf applies that patch before it calls the handler again. So at a
        # poll, what the previous poll handed out is in the API server.
        self._version = 0
        self._handed_out = 0
        self._durable = 0
        self._durable_changed = asyncio.Event()

    @property
    def status(self) -> RecoveryStatus:
        return self._status

    @property
    def live(self) -> RecoveryStatus:
        """The latest status of the running phase: neither finished nor of another phase."""
        return self._live

    def _settle(self) -> None:
        if self._status.phase is self._phase and not self._status.finished:
            self._live, self._live_version = self._status, self._version

    async def update(self, change: StatusChange) -> RecoveryStatus:
        self._status = change(self._status)
        self._version += 1
        self._settle()
        return self._status

    def handed_out(self) -> None:
        """A poll is handing the live status to the handler (see `persisted`)."""
        self._durable, self._handed_out = self._handed_out, self._live_version
        self._durable_changed.set()

    async def persisted(self) -> None:
        """Return once the status as of now is in the API server: two polls from now."""
        target = self._version
        while self._durable < target:
            self._durable_changed.clear()
            await self._durable_changed.wait()

    async def event(self, event: StepEvent) -> None:
        self._events.append(event)

    def replace(self, status: RecoveryStatus) -> None:
        """Set the status directly (a change decided outside the running steps)."""
        self._status = status
        self._settle()

    def replace_live(self, status: RecoveryStatus) -> None:
        """Replace the live status (a condition computed at a poll, e.g. Stalled); the
        current status too while it is the live one."""
        if self._status is self._live:
            self._status = status
        self._live = status

    def drain(self) -> list[StepEvent]:
        events, self._events = self._events, []
        return events


@dataclass(frozen=True)
class RetryPolicy:
    limit: int = 8
    base_delay: float = 5.0
    max_delay: float = 300.0

    def delay(self, attempt: int) -> float:
        return float(min(self.max_delay, self.base_delay * (2 ** max(0, attempt - 1))))


def gate(spec: RecoverySpec, phase: Phase) -> tuple[OutcomeKind, str, str] | None:
    """Whether `phase` may start now: None, or (kind, reason, message) when it may not."""
    if not is_destructive(phase):
        return None
    if spec.dry_run:
        return (
            OutcomeKind.DRY_RUN_DONE,
            "DryRunComplete",
            "dry run complete: every check and read passed; stopped before Staging "
            "(no service was stopped and no database changed)",
        )
    if not spec.confirmed:
        return (
            OutcomeKind.BLOCKED,
            "AwaitingConfirmation",
            f"destructive phases wait: set spec.confirm to {spec.target.deployment!r} "
            "to let Staging, Restoring and Rejoined change the cluster",
        )
    return None


def _retry_key(phase: Phase) -> str:
    return f"retries{phase.value}"


async def execute_phase(
    phase: Phase,
    plan: Plan,
    ctx: StepContext,
    retry: RetryPolicy,
    spec: RecoverySpec,
) -> Outcome:
    """Run one phase's steps to an outcome; errors become status, never escape (but Cancelled)."""
    try:
        await run_steps(plan.for_phase(phase), ctx)
    except Cancelled:
        raise
    except RetryableError as exc:
        reason, text = exc.reason, str(exc)
        attempts = int(ctx.status.facts.get(_retry_key(phase), "0")) + 1
        if attempts > retry.limit:
            return await _fail(plan, ctx, reason, f"{text} (gave up after {retry.limit} retries)")
        delay = exc.delay if exc.delay is not None else retry.delay(attempts)
        message = f"{text}; retry {attempts}/{retry.limit} in {int(delay)}s"
        status = await ctx.update(
            lambda s: st.set_message(st.set_facts(s, **{_retry_key(phase): str(attempts)}), message)
        )
        return Outcome(OutcomeKind.RETRYING, status, delay=delay)
    except RecoveryError as exc:  # FatalError, or an unclassified one: treat as fatal
        return await _fail(plan, ctx, exc.reason, str(exc))
    except Exception as exc:
        # A bug or an unmapped library error. Failing is safer than looping on unknown state;
        # the step records in status say exactly how far the recovery got.
        log.exception("unexpected error in %s", phase.value)
        return await _fail(plan, ctx, "InternalError",
                           f"internal error ({exc.__class__.__name__}): {exc}")
    return await finish_phase(phase, ctx, spec)


def left_in_words(plan: Plan, status: RecoveryStatus) -> str:
    """What the destructive steps that finished did to the cluster, and what to do next."""
    done = [plan.state_words.get(s.name, s.name) for s in status.steps
            if is_destructive(s.phase) and s.state is StepState.SUCCEEDED]
    stopped = [s.name for s in status.steps
               if s.state in (StepState.RUNNING, StepState.FAILED) and is_destructive(s.phase)]
    state = "; ".join(done) if done else "nothing changed yet"
    partly = f"; {stopped[0]} may have run in part" if stopped else ""
    return (f"The cluster is left with: {state}{partly}. Create a new PgRecovery for this "
            "deployment (another name): it continues from here")


# Listing what a failed run keeps is one SSH command per node; a node that does not answer must
# not keep the failure from being reported.
LEFTOVER_LISTING_TIMEOUT = 60.0


async def _fail(plan: Plan, ctx: StepContext, reason: str, message: str) -> Outcome:
    """Failed, with what the run keeps on the VMs and the work volume listed in status
    (`facts.leftovers`): it stays for the next run, and goes when the PgRecovery is deleted.
    After the point of no return the message also says, in words, what state the cluster was
    left in and that a new PgRecovery continues from there; `status.nodes` is refreshed."""
    now = st.now_utc()
    destructive = is_destructive(ctx.status.phase)
    if destructive:
        message = f"{message}. {left_in_words(plan, ctx.status)}"
    failed = await ctx.update(lambda s: st.fail(s, reason, message, now))
    if plan.observe_nodes is not None and destructive:
        try:
            nodes = await asyncio.wait_for(plan.observe_nodes(), LEFTOVER_LISTING_TIMEOUT)
            failed = await ctx.update(lambda s: st.set_nodes(s, tuple(nodes)))
        except Exception as exc:  # noqa: BLE001 - the failure is what must be reported
            log.warning("could not refresh the nodes after the failure: %s", exc)
    if plan.leftovers is not None:
        try:
            found = await asyncio.wait_for(plan.leftovers.find(failed), LEFTOVER_LISTING_TIMEOUT)
            listed = "; ".join(found) if found else "nothing"
        except Exception as exc:  # noqa: BLE001 - the failure is what must be reported
            listed = f"could not be listed: {exc}"
        failed = await ctx.update(lambda s: st.set_facts(s, leftovers=listed[:1500]))
    return Outcome(OutcomeKind.FAILED, failed)


async def finish_phase(phase: Phase, ctx: StepContext, spec: RecoverySpec) -> Outcome:
    """Move to the next phase; a dry run stops here, before the first destructive phase."""
    now = st.now_utc()
    following = next_phase(phase)
    if following is not None and spec.dry_run and is_destructive(following):
        verdict = apply_gate(spec, ctx.status, following)
        if verdict is None:  # cannot happen: dry_run always gates a destructive phase
            raise FatalError("internal error: dry run gate did not hold", reason="InternalError")
        kind, status = verdict
        return Outcome(kind, await ctx.update(lambda _s: status))
    if following is None:
        def succeeded(s: RecoveryStatus) -> RecoveryStatus:
            proof = st.proof_summary(s.restore_proof)
            message = "recovery complete: cluster rejoined and verified"
            message = f"{message}; {proof}" if proof else message
            # A plan whose work goes on outside the cluster (Dingo: Cloud Foundry's bindings)
            # leaves what a person does next in the `nextSteps` fact; it ends the message.
            nxt = s.facts.get("nextSteps")
            return st.succeed(s, f"{message}. Next: {nxt}" if nxt else message, now)

        done = await ctx.update(succeeded)
        return Outcome(OutcomeKind.SUCCEEDED, done)
    status = await ctx.update(lambda s: st.enter_phase(s, following, now))
    return Outcome(OutcomeKind.ADVANCED, status)


def apply_gate(
    spec: RecoverySpec, status: RecoveryStatus, phase: Phase
) -> tuple[OutcomeKind, RecoveryStatus] | None:
    """Status change for a gated phase start, or None when the phase may run."""
    verdict = gate(spec, phase)
    now = st.now_utc()
    if verdict is None:
        return None
    kind, reason, message = verdict
    if kind is OutcomeKind.DRY_RUN_DONE and "stagedDump" in status.facts:
        # Decrypting staged the verified dump on the primary; say so, it takes disk space.
        message += (
            f"; the verified dump is staged at {status.facts['stagedDump']} on "
            f"{status.primary or 'the primary'}: delete it, or run the recovery to use it"
        )
    if kind is OutcomeKind.DRY_RUN_DONE:
        blocked = st.block(status, reason, message, now)
        blocked = st.set_condition(blocked, ConditionType.STALLED, False, "DryRun", "", now)
        return kind, blocked.model_copy(update={"completed_at": now})
    return kind, st.block(status, reason, message, now)


@dataclass
class _Run:
    phase: Phase
    reporter: MemoryReporter
    cancel_event: asyncio.Event
    task: asyncio.Task[Outcome]
    # When kopf last polled this run (monotonic): a running phase that is no longer polled
    # means kopf's watch is dead (`overdue`, read by the liveness probe).
    polled_at: float = field(default_factory=time.monotonic)


class Supervisor:
    """One background task per recovery key; `poll` starts or checks it, `cancel` stops it."""

    def __init__(
        self,
        plan_factory: PlanFactory,
        *,
        poll_interval: float,
        stall_after: float,
        gate_recheck: float,
        retry: RetryPolicy,
        breakpoints: Breakpoints = NO_BREAKPOINTS,
    ) -> None:
        self._plan_factory = plan_factory
        self._breakpoints = breakpoints
        self._poll_interval = poll_interval
        self._stall_after = stall_after
        self._gate_recheck = gate_recheck
        self._retry = retry
        self._runs: dict[str, _Run] = {}

    async def remove_leftovers(self, inputs: PlanInputs, status: RecoveryStatus) -> list[str]:
        """Deletion: stop the recovery's remote work and remove what it left on the VMs and
        the work volume (`Plan.leftovers`). Errors propagate: the caller keeps the finalizer
        and tries again."""
        plan = await self._plan_factory(inputs)
        try:
            removed = await plan.leftovers.remove(status) if plan.leftovers is not None else []
        finally:
            await plan.close()
        return removed + await self.remove_work_dir(inputs)

    @staticmethod
    async def remove_work_dir(inputs: PlanInputs) -> list[str]:
        """The operator's work directory of this recovery is its own, whatever the plan kept in
        it (WAL segments, parts): it goes as a whole."""
        if not await asyncio.to_thread(os.path.isdir, inputs.work_dir):
            return []
        await asyncio.to_thread(shutil.rmtree, inputs.work_dir, ignore_errors=True)
        return [f"operator:{inputs.work_dir}"]

    def running(self, key: str) -> bool:
        run = self._runs.get(key)
        return run is not None and not run.task.done()

    async def poll(
        self,
        key: str,
        phase: Phase,
        status: RecoveryStatus,
        inputs: Callable[[], PlanInputs],
        extra_gate: Callable[[], Awaitable[tuple[str, str] | None]] | None = None,
    ) -> Outcome:
        """Start the phase if it is not running, else report on it. Never blocks for long."""
        run = self._runs.get(key)
        if run is not None and run.phase is not phase:
            # A stale run of an earlier phase (e.g. status was reset by hand): discard it.
            await self._discard(key)
            run = None
        if run is None:
            spec = inputs().spec
            gated = apply_gate(spec, status, phase)
            if gated is None and extra_gate is not None and is_destructive(phase):
                held = await extra_gate()
                if held is not None:
                    now = st.now_utc()
                    gated = (OutcomeKind.BLOCKED, st.block(status, held[0], held[1], now))
            if gated is not None:
                kind, blocked = gated
                delay = self._gate_recheck if kind is OutcomeKind.BLOCKED else 0.0
                return Outcome(kind, blocked, delay=delay)
            now = st.now_utc()
            status = st.unblock(status, now)
            run = self._start(key, phase, status, inputs())
        return self._report(key, run)

    def _start(self, key: str, phase: Phase, status: RecoveryStatus, inputs: PlanInputs) -> _Run:
        reporter = MemoryReporter(status)
        cancel_event = asyncio.Event()
        ctx = StepContext(
            reporter=reporter, cancel_event=cancel_event, breakpoints=self._breakpoints
        )
        task = asyncio.create_task(
            self._run_phase(phase, inputs, ctx), name=f"pgrecovery:{key}:{phase.value}"
        )
        run = _Run(phase, reporter, cancel_event, task)
        self._runs[key] = run
        return run

    async def _run_phase(self, phase: Phase, inputs: PlanInputs, ctx: StepContext) -> Outcome:
        plan = await self._plan_factory(inputs)
        try:
            return await execute_phase(phase, plan, ctx, self._retry, inputs.spec)
        finally:
            await plan.close()

    def overdue(self, limit: float) -> list[str]:
        """Keys of the runs that kopf has not polled for more than `limit` seconds."""
        now = time.monotonic()
        return [key for key, run in self._runs.items() if now - run.polled_at > limit]

    def _report(self, key: str, run: _Run) -> Outcome:
        now = st.now_utc()
        run.polled_at = time.monotonic()
        if not run.task.done():
            # Never the phase's final status while the task still runs (it may be closing the
            # plan): that belongs to the outcome the next poll reports once the task is done.
            status = st.check_stalled(run.reporter.live, now, self._stall_after)
            # Keep the computed Stalled condition in the run so the next change builds on it.
            run.reporter.replace_live(status)
            run.reporter.handed_out()
            return Outcome(
                OutcomeKind.RUNNING, status, delay=self._poll_interval, events=run.reporter.drain()
            )
        del self._runs[key]
        events = run.reporter.drain()
        try:
            outcome = run.task.result()
        except Cancelled as exc:
            cancelled = st.fail(run.reporter.status, exc.reason, str(exc), now)
            return Outcome(OutcomeKind.CANCELLED, cancelled, events=events)
        except Exception as exc:  # noqa: BLE001 - errors of the plan factory become outcomes
            reason = getattr(exc, "reason", "InternalError")
            if isinstance(exc, RetryableError):
                return Outcome(
                    OutcomeKind.RETRYING,
                    st.set_message(run.reporter.status, str(exc)),
                    delay=self._retry.base_delay,
                    events=events,
                )
            failed = st.fail(run.reporter.status, reason, str(exc), now)
            return Outcome(OutcomeKind.FAILED, failed, events=events)
        outcome.events = events + outcome.events
        return outcome

    def amend(self, key: str, change: StatusChange) -> bool:
        """Apply a change made outside the running phase (e.g. a spec edit noted by another
        handler) to the running phase's status too, so its next report does not undo it."""
        run = self._runs.get(key)
        if run is None:
            return False
        run.reporter.replace(change(run.reporter.status))
        return True

    async def cancel(self, key: str, timeout: float) -> RecoveryStatus | None:
        """Ask the running phase to stop at its next safe point; wait up to `timeout`."""
        run = self._runs.get(key)
        if run is None:
            return None
        run.cancel_event.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(run.task), timeout)
        status = run.reporter.status
        if not run.task.done():
            run.task.cancel()
            with contextlib.suppress(BaseException):
                await run.task
        self._runs.pop(key, None)
        return status

    async def _discard(self, key: str) -> None:
        run = self._runs.pop(key, None)
        if run is not None and not run.task.done():
            run.task.cancel()
            with contextlib.suppress(BaseException):
                await run.task

    async def close(self) -> None:
        for key in list(self._runs):
            await self._discard(key)
