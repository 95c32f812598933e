"""kopf handlers for PgRecovery: one per phase, each a thin translation into engine calls.

Why this module exists: it is the only place that knows kopf's calling conventions. Each
handler reads the status, asks the engine what to do (accept / poll the phase / note a spec
change / cancel), writes the resulting status into kopf's patch, turns step transitions into
Events, and — while work continues — raises `kopf.TemporaryError` with a delay so kopf calls it
again (the start / poll pattern: handlers never sleep or block).

How phases chain: each phase handler is `@kopf.on.field('status.phase', new=<Phase>)`. When a
phase finishes, its handler patches `status.phase` to the next phase; kopf sees that field change
and fires the next handler. A handler interrupted by an operator restart is rerun by kopf (its
progress is kept in our annotations), and the engine's idempotent steps skip finished work.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from pgrecovery import metrics
from pgrecovery.engine import status as st
from pgrecovery.engine.lifecycle import accept_or_reject, spec_change
from pgrecovery.engine.locks import RecoveryRef, deployment_gate, inheritor_of_leftovers
from pgrecovery.engine.phases import WORKING_PHASES, Phase, is_destructive
from pgrecovery.engine.status import WARNING_CONDITIONS, ConditionType, RecoveryStatus
from pgrecovery.engine.steps import StepEvent, StepEventKind
from pgrecovery.engine.supervisor import Outcome, OutcomeKind
from pgrecovery.errors import RecoveryError
from pgrecovery.handlers.runtime import Runtime

GROUP = "pgrecovery.dev"
VERSION = "v1alpha1"
PLURAL = "pgrecoveries"

log = logging.getLogger(__name__)


def _runtime(memo: Any) -> Runtime:
    runtime: Runtime = memo["runtime"]
    return runtime


def _write_status(patch: Any, status: RecoveryStatus) -> None:
    patch.status.update(status.to_dict())


def _post_step_event(body: Any, event: StepEvent) -> None:
    kind = "Warning" if event.kind is StepEventKind.FAILED else "Normal"
    message = f"{event.phase.value}/{event.step}"
    if event.message:
        message += f": {event.message}"
    kopf.event(body, type=kind, reason=event.kind.value, message=message[:1024])
    metrics.record_step_event(event.phase.value, event.kind.value)


def _post_warning_events(body: Any, before: RecoveryStatus, after: RecoveryStatus) -> None:
    """A Warning Event when a warning condition (`status.WARNING_CONDITIONS`) turns True."""
    for kind in WARNING_CONDITIONS:
        condition = after.condition(kind)
        if condition is not None and condition.status == "True" and not before.is_true(kind):
            kopf.event(body, type="Warning", reason=kind.value, message=condition.message[:1024])


def _post_outcome_event(body: Any, outcome: Outcome, phase: Phase) -> None:
    status = outcome.status
    if outcome.kind is OutcomeKind.ADVANCED:
        kopf.event(
            body,
            type="Normal",
            reason=f"Phase{status.phase.value}",
            message=f"{phase.value} done; {status.phase.value} started",
        )
    elif outcome.kind is OutcomeKind.SUCCEEDED:
        kopf.event(body, type="Normal", reason="Succeeded", message=status.message)
    elif outcome.kind in (OutcomeKind.FAILED, OutcomeKind.CANCELLED):
        kopf.event(
            body, type="Warning", reason=status.failure_reason or "Failed", message=status.message
        )
    elif outcome.kind is OutcomeKind.DRY_RUN_DONE:
        kopf.event(body, type="Normal", reason="DryRunComplete", message=status.message)


def _record_metrics(body: Any, outcome: Outcome, phase: Phase) -> None:
    name = f"{body['metadata']['namespace']}/{body['metadata']['name']}"
    status = outcome.status
    metrics.record_progress(name, status)
    if outcome.kind in (
        OutcomeKind.ADVANCED,
        OutcomeKind.SUCCEEDED,
        OutcomeKind.FAILED,
        OutcomeKind.CANCELLED,
        OutcomeKind.DRY_RUN_DONE,
    ):
        duration = status.phase_durations.get(phase.value)
        if duration is not None:
            metrics.record_phase_duration(phase.value, duration)
    if outcome.kind is OutcomeKind.SUCCEEDED:
        metrics.record_result(name, "succeeded", None)
        if status.restore_proof is not None:
            metrics.record_restored_rows(status.restore_proof.rows)
    elif outcome.kind in (OutcomeKind.FAILED, OutcomeKind.CANCELLED):
        metrics.record_result(name, "failed", status.failure_reason)
    elif outcome.kind is OutcomeKind.DRY_RUN_DONE:
        metrics.record_result(name, "dry_run", None)


@kopf.on.create(GROUP, VERSION, PLURAL, id="accept")
async def accept(body: Any, meta: Any, patch: Any, **_: Any) -> None:
    """Parse the spec: valid → Fetching, invalid → Failed naming the field. Runs once."""
    status = RecoveryStatus.from_dict(body.get("status"))
    new = accept_or_reject(dict(body.get("spec") or {}), status, meta.get("generation"))
    if new == status:
        return
    _write_status(patch, new)
    if new.phase is Phase.FAILED:
        kopf.event(
            body, type="Warning", reason=new.failure_reason or "InvalidSpec", message=new.message
        )
        metrics.record_result(f"{meta['namespace']}/{meta['name']}", "failed", new.failure_reason)
    else:
        kopf.event(
            body,
            type="Normal",
            reason=f"Phase{new.phase.value}",
            message=f"spec accepted; {new.phase.value} started",
        )


# The id is also the keyword under which kopf passes the index to handlers.
@kopf.index(GROUP, VERSION, PLURAL, id="by_deployment")
def by_deployment(body: Any, meta: Any, **_: Any) -> dict[str, RecoveryRef]:
    """Every PgRecovery by target deployment, for the one-destructive-recovery-at-a-time gate."""
    status = RecoveryStatus.from_dict(body.get("status"))
    deployment = ((body.get("spec") or {}).get("target") or {}).get("deployment") or ""
    ref = RecoveryRef(
        uid=meta["uid"],
        name=f"{meta['namespace']}/{meta['name']}",
        deployment=deployment,
        phase=status.phase,
        finished=status.finished,
        started_destructive=any(is_destructive(step.phase) for step in status.steps),
        started=bool(status.steps),
    )
    return {deployment: ref}


async def _claim_executor(runtime: Runtime, meta: Any, doing: str) -> None:
    """Go on only if this replica executes the recovery (its Lease, `engine.executor`); else
    ask kopf to call again later, without touching the status the executor writes."""
    try:
        holder = await runtime.executor.claim(meta["namespace"], meta["uid"])
    except RecoveryError as exc:
        raise kopf.TemporaryError(f"{doing}: executor lease: {exc}",
                                  delay=runtime.settings.gate_recheck) from None
    if holder is not None:
        raise kopf.TemporaryError(f"{doing}: executed by replica {holder}",
                                  delay=runtime.settings.gate_recheck)


def _make_phase_handler(phase: Phase) -> Any:
    async def handle_phase(
        body: Any, meta: Any, patch: Any, memo: Any, by_deployment: Any, **_: Any
    ) -> None:
        status = RecoveryStatus.from_dict(body.get("status"))
        if status.finished or status.phase is not phase:
            return
        if meta.get("deletionTimestamp"):
            # Being deleted: the delete handler stops the work and cleans up; a poll arriving
            # now must not start the phase again behind its back.
            return
        runtime = _runtime(memo)
        await _claim_executor(runtime, meta, phase.value)
        me = RecoveryRef(
            uid=meta["uid"],
            name=f"{meta['namespace']}/{meta['name']}",
            deployment=((body.get("spec") or {}).get("target") or {}).get("deployment") or "",
            phase=phase,
            finished=False,
            started_destructive=False,
        )

        async def deployment_free() -> tuple[str, str] | None:
            others = list(by_deployment.get(me.deployment, []))
            return deployment_gate(me, others, runtime.claims)

        outcome = await runtime.supervisor.poll(
            meta["uid"], phase, status, lambda: runtime.inputs(body, status), deployment_free
        )
        if outcome.kind in (OutcomeKind.SUCCEEDED, OutcomeKind.FAILED, OutcomeKind.CANCELLED):
            runtime.claims.release(meta["uid"])
            await runtime.executor.drop(meta["namespace"], meta["uid"])
        _write_status(patch, outcome.status)
        for event in outcome.events:
            _post_step_event(body, event)
        _post_warning_events(body, status, outcome.status)
        _post_outcome_event(body, outcome, phase)
        _record_metrics(body, outcome, phase)
        if outcome.again:
            # Not an error: kopf's way of "call me again in N seconds" (the poll pattern).
            raise kopf.TemporaryError(outcome.status.message or phase.value, delay=outcome.delay)

    handle_phase.__name__ = f"handle_{phase.value.lower()}"
    handle_phase.__qualname__ = handle_phase.__name__
    return handle_phase


for _phase in WORKING_PHASES:
    kopf.on.field(
        GROUP,
        VERSION,
        PLURAL,
        field="status.phase",
        new=_phase.value,
        id=f"phase-{_phase.value.lower()}",
        # Unlimited retries: a phase ends only through its outcome (Succeeded/Failed/…);
        # the engine's own retry policy bounds retryable errors.
        retries=None,
    )(_make_phase_handler(_phase))


@kopf.on.update(GROUP, VERSION, PLURAL, field="spec", id="spec-changed")
async def spec_changed(body: Any, meta: Any, patch: Any, memo: Any, **_: Any) -> None:
    """After start only `confirm` is honoured; other edits are ignored, visibly."""
    raw_spec, generation = dict(body.get("spec") or {}), meta.get("generation")
    status = RecoveryStatus.from_dict(body.get("status"))
    new = spec_change(raw_spec, status, generation)
    if new == status:
        return
    # A running phase reports its in-memory status on every poll; amend it as well, or the
    # next poll would overwrite this change.
    _runtime(memo).supervisor.amend(
        meta["uid"], lambda current: spec_change(raw_spec, current, generation)
    )
    _write_status(patch, new)
    ignored = new.condition(ConditionType.SPEC_CHANGE_IGNORED)
    if ignored is not None and ignored.status == "True":
        kopf.event(body, type="Warning", reason="SpecChangeIgnored", message=ignored.message)


# Set to "true" on a PgRecovery being deleted to release it although its files could not be
# removed from the VMs (a node that is gone for good); the event says what stays behind.
FORCE_DELETE_ANNOTATION = f"{GROUP}/force-delete"


def _has_leftovers(status: RecoveryStatus) -> bool:
    """A step ran that writes to the VMs or the work volume, and no cleanup finished since."""
    if status.facts.get("cleanup", "").startswith("done"):
        return False
    return any(step.phase is Phase.DECRYPTING or is_destructive(step.phase)
               for step in status.steps)


@kopf.on.delete(GROUP, VERSION, PLURAL, id="cancel")
async def cancel(body: Any, meta: Any, memo: Any, patch: Any, retry: int, **kwargs: Any) -> None:
    """Stop running work at the next safe point, say what state the cluster was left in, then
    remove what the recovery left on the VMs and the work volume; kopf keeps the finalizer
    (and calls again) until that worked or the force-delete annotation is set."""
    runtime = _runtime(memo)
    status = RecoveryStatus.from_dict(body.get("status"))
    # The replica that executes the recovery stops it and cleans up; another one waits (and
    # takes over if the executor is gone for a whole lease duration).
    await _claim_executor(runtime, meta, "deletion")
    stopped = await runtime.supervisor.cancel(meta["uid"], runtime.settings.cancel_grace)
    runtime.claims.release(meta["uid"])
    final = stopped or status
    if retry == 0:
        _post_deleted_event(body, final, stopped is not None)
    if _has_leftovers(final):
        me = RecoveryRef(
            uid=meta["uid"],
            name=f"{meta['namespace']}/{meta['name']}",
            deployment=((body.get("spec") or {}).get("target") or {}).get("deployment") or "",
            phase=final.phase,
            finished=final.finished,
            started_destructive=False,
        )
        # kopf passes its indexes by their id (`by_deployment`, above).
        others = kwargs["by_deployment"].get(me.deployment, [])
        inheritor = inheritor_of_leftovers(me, others)
        if inheritor is not None:
            await _leave_leftovers_to(body, runtime, final, inheritor)
        else:
            await _remove_leftovers(body, meta, patch, runtime, final)
    await runtime.executor.drop(meta["namespace"], meta["uid"])
    metrics.forget(f"{meta['namespace']}/{meta['name']}")


async def _remove_leftovers(
    body: Any, meta: Any, patch: Any, runtime: Runtime, status: RecoveryStatus
) -> None:
    if (meta.get("annotations") or {}).get(FORCE_DELETE_ANNOTATION) == "true":
        kopf.event(body, type="Warning", reason="LeftoversAbandoned",
                   message=(f"{FORCE_DELETE_ANNOTATION}=true: released without cleanup; left: "
                            f"{status.facts.get('leftovers', 'not listed')}")[:1024])
        return
    try:
        removed = await runtime.supervisor.remove_leftovers(runtime.inputs(body, status), status)
    except Exception as exc:  # noqa: BLE001 - any failure keeps the finalizer, visibly
        text = (f"cleanup after deletion failed: {exc}; the finalizer stays and the cleanup is "
                f"retried; to release it anyway: kubectl annotate pgr {meta['name']} "
                f"{FORCE_DELETE_ANNOTATION}=true (the files then stay on the VMs)")
        _write_status(patch, st.set_message(status, text))
        kopf.event(body, type="Warning", reason="CleanupBlocked", message=text[:1024])
        raise kopf.TemporaryError(text, delay=runtime.settings.retry_base_delay) from None
    kopf.event(body, type="Normal", reason="CleanedUp",
               message=(f"removed {len(removed)}: {'; '.join(removed) or 'nothing was left'}"
                        )[:1024])


async def _leave_leftovers_to(
    body: Any, runtime: Runtime, status: RecoveryStatus, inheritor: RecoveryRef
) -> None:
    """Another recovery of the deployment is running and works with the same files on the VMs
    (it may have re-used the staged dump; its job records share the state directory): removing
    them now would break it. They are left to it (its success removes everything pgrecovery has
    on the VMs; a failure lists them for its own deletion); this recovery's own work directory
    on the operator's volume goes."""
    removed = await runtime.supervisor.remove_work_dir(runtime.inputs(body, status))
    kopf.event(
        body, type="Normal", reason="LeftoversHandedOver",
        message=(f"the files on the VMs stay for PgRecovery {inheritor.name} of the same "
                 f"deployment (phase {inheritor.phase.value}), which uses them and removes them "
                 f"when it succeeds; removed: {'; '.join(removed) or 'nothing'}; on the VMs: "
                 f"{status.facts.get('leftovers', 'not listed')}")[:1024],
    )


def _post_deleted_event(body: Any, final: RecoveryStatus, stopped: bool) -> None:
    done = [s.name for s in final.steps if s.state.value == "Succeeded"]
    message = (
        f"deleted during {final.phase.value}"
        + (" (work stopped at a safe point)" if stopped else "")
        + f"; steps completed: {', '.join(done) or 'none'}"
        + "; nodes: "
        + (", ".join(f"{n.name}={n.role}/{n.state or '?'}" for n in final.nodes) or "not probed")
    )
    kopf.event(
        body,
        type="Warning" if stopped else "Normal",
        reason="Deleted",
        message=message[:1024],
    )
