"""Local mode: run a whole recovery in this process, without Kubernetes.

Why this module exists: in a real disaster the Kubernetes cluster may be gone too. The same
phases, steps, gates and status run here; the status is written to a JSON file after every
change (atomically), so an interrupted run continues with `--resume` exactly where it stopped,
and a person can read the file to see which steps ran. Progress and step transitions go to a
callback (the CLI prints them). Nothing here is specific to a terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgrecovery.engine import status as st
from pgrecovery.engine.breakpoints import NO_BREAKPOINTS, Breakpoints
from pgrecovery.engine.lifecycle import accept_or_reject, effective_spec
from pgrecovery.engine.plan import PlanFactory, PlanInputs, SecretSource
from pgrecovery.engine.spec import RecoverySpec
from pgrecovery.engine.status import RecoveryStatus
from pgrecovery.engine.steps import StatusChange, StepContext, StepEvent
from pgrecovery.engine.supervisor import (
    OutcomeKind,
    RetryPolicy,
    apply_gate,
    execute_phase,
)
from pgrecovery.errors import Cancelled, ConfigurationError

# Writing the status file on every byte-progress update would cost more than the work; step
# transitions are always written at once, progress at most this often (seconds).
PROGRESS_WRITE_INTERVAL = 1.0


class StatusFile:
    """The status as a JSON file, replaced atomically (write temp, fsync, rename)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> tuple[dict[str, Any], RecoveryStatus]:
        try:
            document = json.loads(self.path.read_text())
        except FileNotFoundError:
            raise ConfigurationError(
                f"--resume: no status file at {self.path}; run without --resume to start"
            ) from None
        except json.JSONDecodeError as exc:
            raise ConfigurationError(f"status file {self.path} is not valid JSON: {exc}") from None
        return document.get("spec") or {}, RecoveryStatus.from_dict(document.get("status"))

    def save(self, spec: dict[str, Any], status: RecoveryStatus) -> None:
        document = {"kind": "PgRecoveryStatus", "spec": spec, "status": status.to_dict()}
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w") as handle:
            json.dump(document, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(self.path)


class FileReporter:
    """A Reporter that keeps the status file current and forwards events to a callback."""

    def __init__(
        self,
        status: RecoveryStatus,
        spec: dict[str, Any],
        file: StatusFile,
        on_event: Callable[[StepEvent | None, RecoveryStatus], None],
    ) -> None:
        self._status = status
        self._spec = spec
        self._file = file
        self._on_event = on_event
        self._last_write = 0.0

    @property
    def status(self) -> RecoveryStatus:
        return self._status

    async def update(self, change: StatusChange) -> RecoveryStatus:
        before = self._status
        self._status = change(before)
        steps_changed = self._status.steps != before.steps or self._status.phase != before.phase
        now = time.monotonic()
        if steps_changed or now - self._last_write >= PROGRESS_WRITE_INTERVAL:
            self.flush()
            self._on_event(None, self._status)
        return self._status

    async def event(self, event: StepEvent) -> None:
        self.flush()
        self._on_event(event, self._status)

    async def persisted(self) -> None:
        self.flush()

    def flush(self) -> None:
        self._file.save(self._spec, self._status)
        self._last_write = time.monotonic()


@dataclass(frozen=True)
class LocalRun:
    """What a local recovery needs; `spec` is the raw spec mapping of the recovery file."""

    name: str
    spec: dict[str, Any]
    status_file: Path
    work_dir: Path
    secrets: SecretSource
    plan_factory: PlanFactory
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # Test-only stopping points (`engine.breakpoints`), as in the operator.
    breakpoints: Breakpoints = NO_BREAKPOINTS


async def run_local(
    run: LocalRun,
    *,
    resume: bool,
    on_event: Callable[[StepEvent | None, RecoveryStatus], None],
    cancel_event: asyncio.Event | None = None,
) -> RecoveryStatus:
    """Run (or resume) a recovery to an end state; the status file is current throughout."""
    file = StatusFile(run.status_file)
    if resume:
        stored_spec, status = file.load()
        # The stored spec is the one accepted at start; the file given now may only change
        # `confirm` (the same rule as in the operator).
        raw = {**stored_spec, "confirm": run.spec.get("confirm", stored_spec.get("confirm", ""))}
    else:
        if run.status_file.exists():
            raise ConfigurationError(
                f"status file {run.status_file} exists: continue with --resume, or move it away "
                "to start a new recovery"
            )
        raw = run.spec
        status = accept_or_reject(raw, RecoveryStatus(), 1)
        # A run of its own, like a new object's uid in Kubernetes: the jobs it starts on the
        # VMs are named after it, so a new run of the same manifest (after a Failed one, whose
        # restore job may have vanished with a rebooted primary) never adopts the old jobs.
        status = st.set_facts(status, localRunId=uuid.uuid4().hex[:8])
    reporter = FileReporter(status, raw, file, on_event)
    reporter.flush()
    cancel = cancel_event or asyncio.Event()
    while not reporter.status.finished:
        status = reporter.status
        spec = effective_spec(raw, status)
        gated = apply_gate(spec, status, status.phase)
        if gated is not None:
            kind, blocked = gated
            await reporter.update(lambda _s, b=blocked: b)  # type: ignore[misc]
            if kind is OutcomeKind.BLOCKED:
                break  # waiting for a person: the status file says what to set, then --resume
            continue
        status = await reporter.update(lambda s: st.unblock(s, st.now_utc()))
        plan = await run.plan_factory(_inputs(run, spec, status))
        ctx = StepContext(reporter=reporter, cancel_event=cancel, breakpoints=run.breakpoints)
        try:
            outcome = await execute_phase(status.phase, plan, ctx, run.retry, spec)
        except Cancelled:
            with contextlib.suppress(Exception):
                await plan.close()
            message = (
                f"interrupted in {reporter.status.phase.value}; continue with --resume "
                "(finished steps are not repeated)"
            )
            await reporter.update(lambda s, m=message: st.set_message(s, m))  # type: ignore[misc]
            reporter.flush()
            raise
        await plan.close()
        if outcome.kind is OutcomeKind.RETRYING:
            await asyncio.sleep(outcome.delay)
    reporter.flush()
    return reporter.status


def _inputs(run: LocalRun, spec: RecoverySpec, status: RecoveryStatus) -> PlanInputs:
    return PlanInputs(
        name=run.name,
        namespace="local",
        # Status files of earlier versions carry no localRunId: their jobs keep their names.
        uid=f"{status.facts['localRunId']}-{run.name}" if "localRunId" in status.facts
        else run.name,
        spec=spec,
        secrets=run.secrets,
        work_dir=str(run.work_dir),
    )


async def cleanup_local(run: LocalRun) -> list[str]:
    """`pgrecovery cleanup`: stop the run's remote work and remove what it left on the VMs and
    in its work directory (after a failure, or an interrupted run given up). The status file
    stays: it is the record of what happened, and it holds no secret."""
    file = StatusFile(run.status_file)
    stored_spec, status = file.load()
    if status.facts.get("cleanup", "").startswith("done"):
        return []
    plan = await run.plan_factory(_inputs(run, effective_spec(stored_spec, status), status))
    try:
        removed = await plan.leftovers.remove(status) if plan.leftovers is not None else []
    finally:
        await plan.close()
    file.save(stored_spec, st.set_facts(status, cleanup=f"done by pgrecovery cleanup; removed "
                                                        f"{len(removed)}"))
    return removed

