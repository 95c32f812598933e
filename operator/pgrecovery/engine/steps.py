"""Steps and the runner that walks a phase's steps.

Why this module exists: every phase is a list of idempotent steps, each named for the state it
ensures (`ensure-standbys-stopped`). The runner does `check → apply → check` for each, records
start/finish in status through a `Reporter`, and is the only code that decides what "resume"
means: a step whose check passes is recorded as done without running again, so an operator
killed at any moment continues where it stopped when the phase runs again.

The runner knows nothing about Kubernetes or files: the kopf handlers and the local runner each
provide a `Reporter` that persists status their way (status patch / JSON file) and turns step
transitions into Events or terminal lines.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from pgrecovery.engine import status as st
from pgrecovery.engine.breakpoints import NO_BREAKPOINTS, Breakpoints, before_step
from pgrecovery.engine.phases import Phase
from pgrecovery.engine.status import RecoveryStatus, StepState
from pgrecovery.errors import Cancelled, FatalError

log = logging.getLogger(__name__)

StatusChange = Callable[[RecoveryStatus], RecoveryStatus]


class StepEventKind(StrEnum):
    STARTED = "StepStarted"
    FINISHED = "StepFinished"
    SKIPPED = "StepSkipped"
    FAILED = "StepFailed"


@dataclass(frozen=True)
class StepEvent:
    """One step transition, for an Event / a terminal line / a metric."""

    kind: StepEventKind
    phase: Phase
    step: str
    message: str = ""
    reason: str = ""


class Reporter(Protocol):
    """Where a running phase sends its status changes and step events."""

    async def update(self, change: StatusChange) -> RecoveryStatus:
        """Apply a pure status change, persist it (possibly later, batched), return the result."""
        ...

    async def event(self, event: StepEvent) -> None:
        """A step started, finished, was skipped or failed."""
        ...

    async def persisted(self) -> None:
        """Return once every change so far is durable (in the API server / the status file)."""
        ...

    @property
    def status(self) -> RecoveryStatus:
        """The latest status (after all updates so far)."""
        ...


@dataclass
class StepContext:
    """What a step sees: the current status, a way to change it, progress and cancellation."""

    reporter: Reporter
    cancel_event: asyncio.Event = field(default_factory=asyncio.Event)
    # Test-only stopping points (`engine.breakpoints`); production has none.
    breakpoints: Breakpoints = NO_BREAKPOINTS

    @property
    def status(self) -> RecoveryStatus:
        return self.reporter.status

    async def update(self, change: StatusChange) -> RecoveryStatus:
        return await self.reporter.update(change)

    async def progress(self, done: int, total: int | None, detail: str = "") -> None:
        now = st.now_utc()
        await self.reporter.update(lambda s: st.record_progress(s, done, total, now, detail))

    async def fact(self, **facts: str) -> None:
        await self.reporter.update(lambda s: st.set_facts(s, **facts))

    async def checkpoint(self) -> None:
        """Wait until the status so far is durable: a step that is about to remove what the
        resume of earlier steps relies on records that first, and makes sure it survives a
        crash (`Reporter.persisted`)."""
        await self.reporter.persisted()

    def raise_if_cancelled(self) -> None:
        """Call at safe points only: between steps and inside long steps where stopping is safe."""
        if self.cancel_event.is_set():
            raise Cancelled("the PgRecovery was deleted; stopped at a safe point")


class Step(Protocol):
    """An idempotent unit of work: `check` says whether its state already holds."""

    @property
    def name(self) -> str:
        """Named for the state the step ensures, e.g. `ensure-standbys-stopped`."""
        ...

    async def check(self, ctx: StepContext) -> bool:
        """True when the state this step ensures already holds (then `apply` is skipped)."""
        ...

    async def apply(self, ctx: StepContext) -> None:
        """Bring about the state. Safe to call again after a crash half-way."""
        ...


@dataclass(frozen=True)
class FunctionStep:
    """A step made of two plain async functions; most steps are written this way."""

    name: str
    check_fn: Callable[[StepContext], Awaitable[bool]]
    apply_fn: Callable[[StepContext], Awaitable[None]]
    # Some steps have no cheap check (e.g. "probe the cluster" must always run): they check
    # False before apply and trust apply's own verification afterwards.
    verify_after: bool = True

    async def check(self, ctx: StepContext) -> bool:
        return await self.check_fn(ctx)

    async def apply(self, ctx: StepContext) -> None:
        await self.apply_fn(ctx)


async def operation_checks_itself(_ctx: StepContext) -> bool:
    """The check of a `self_checking` step: there is none apart from the operation."""
    return False


def self_checking(name: str, apply: Callable[[StepContext], Awaitable[None]]) -> FunctionStep:
    """A step whose operation checks itself, the one alternative to a real `check`: it looks
    at the target, does only what is missing and verifies it (check → apply → check inside,
    idempotent), or it is a read-only check that must run on every phase run (probing the
    cluster, free space). The engine always runs it, and trusts it afterwards; what it found
    in place it reports as "unchanged"."""
    return FunctionStep(name, operation_checks_itself, apply, verify_after=False)


def checks_itself(step: Step) -> bool:
    return isinstance(step, FunctionStep) and step.check_fn is operation_checks_itself


async def run_step(step: Step, ctx: StepContext) -> None:
    """check → apply → check for one step, with its events and status records."""
    phase = ctx.status.phase
    ctx.raise_if_cancelled()
    await ctx.breakpoints.reach(before_step(step.name))
    ctx.raise_if_cancelled()
    if await step.check(ctx):
        now = st.step_clock()
        previous = ctx.status.step(step.name)
        if previous is None or previous.state is not StepState.SUCCEEDED:
            await ctx.update(
                lambda s: st.touch(
                    st.step_finished(s, step.name, now, message="already in the wanted state"),
                    now,
                )
            )
            await ctx.reporter.event(
                StepEvent(StepEventKind.SKIPPED, phase, step.name, "already in the wanted state")
            )
        return
    now = st.step_clock()
    await ctx.update(lambda s: st.step_started(s, step.name, now))
    await ctx.reporter.event(StepEvent(StepEventKind.STARTED, phase, step.name))
    try:
        await step.apply(ctx)
        verify = getattr(step, "verify_after", True)
        if verify and not await step.check(ctx):
            raise FatalError(
                f"step {step.name} finished but its state does not hold; see the operator log",
                reason="StepNotEffective",
            )
    except Exception as exc:
        now = st.step_clock()
        message = str(exc) or exc.__class__.__name__
        reason = getattr(exc, "reason", exc.__class__.__name__)
        await ctx.update(
            lambda s: st.step_finished(s, step.name, now, state=StepState.FAILED, message=message)
        )
        await ctx.reporter.event(
            StepEvent(StepEventKind.FAILED, phase, step.name, message, reason=reason)
        )
        raise
    now = st.step_clock()
    await ctx.update(lambda s: st.touch(st.step_finished(s, step.name, now), now))
    await ctx.reporter.event(StepEvent(StepEventKind.FINISHED, phase, step.name))


async def run_steps(steps: Sequence[Step], ctx: StepContext) -> None:
    """Run a phase's steps in order; a raised error stops the phase (caller records it)."""
    for step in steps:
        await run_step(step, ctx)
