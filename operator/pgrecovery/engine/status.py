"""The status of a recovery: a fixed shape, changed only by small pure functions.

Why this module exists: `status` is what users, `kubectl wait`, Argo CD and alerts read, and it
is also the only memory a recovery has across operator restarts (the local mode writes the same
shape to a JSON file for `--resume`). Keeping its shape in one frozen model and every change in
a pure function (old status + facts + now → new status) makes each transition unit-testable and
keeps handlers and the local runner from growing their own ideas of what a status looks like.

Conditions follow the Kubernetes API conventions (type, status "True"/"False"/"Unknown",
reason in CamelCase, message, lastTransitionTime that moves only when status changes,
observedGeneration). Types used:

- `Progressing` — True while phases run; False once finished or blocked.
- `Stalled`     — True when no progress was reported for `stall_after` seconds.
- `Succeeded`   — True when Rejoined finished and the cluster was verified.
- `Failed`      — True when the recovery ended Failed (reason = failureReason).
- `Blocked`     — True while waiting for something a person controls
                  (reasons: AwaitingConfirmation, DeploymentBusy, DryRunComplete).
- `SpecChangeIgnored` — True when spec changed after the recovery started (ignored by design).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pgrecovery.engine.phases import Phase

# A status message longer than this is truncated: status is read in `kubectl get -o yaml`,
# and etcd objects have a size limit; the full text goes to the log.
MAX_MESSAGE = 1024
MAX_STEPS = 200


def _camel(name: str) -> str:
    return re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), name)


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=_camel, populate_by_name=True, frozen=True, extra="ignore"
    )


class ConditionType(StrEnum):
    PROGRESSING = "Progressing"
    STALLED = "Stalled"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    BLOCKED = "Blocked"
    SPEC_CHANGE_IGNORED = "SpecChangeIgnored"
    GHOST_DEPLOYMENTS_POSSIBLE = "GhostDeploymentsPossible"
    """The restored backup is older than the newest one: service instances created in between
    may be unknown to an a9s framework restored from it (the runbook's "Limitations")."""


#: Conditions that are warnings: the handler posts a Warning Event when one turns True.
WARNING_CONDITIONS = (ConditionType.GHOST_DEPLOYMENTS_POSSIBLE,)


class StepState(StrEnum):
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SKIPPED = "Skipped"


class Condition(_Model):
    type: ConditionType
    status: str  # "True" | "False" | "Unknown", as strings per the API conventions
    reason: str
    message: str = ""
    last_transition_time: datetime
    observed_generation: int | None = None


class BackupInfo(_Model):
    id: str | None = None
    taken_at: datetime | None = None
    parts: int | None = None
    size_bytes: int | None = None
    plain_size_bytes: int | None = None
    plain_sha256: str | None = None


class Progress(_Model):
    phase_bytes_done: int = 0
    phase_bytes_total: int | None = None
    percent: int | None = None
    last_progress_at: datetime | None = None
    detail: str = ""


class NodeState(_Model):
    name: str
    role: str = "unknown"  # primary | standby | unknown
    monit: str = ""  # short monit summary, e.g. "postgresql-ha=OK repmgr=OK"
    state: str = ""  # reachable | stopped | recloned | streaming | unreachable …


class StepRecord(_Model):
    name: str
    phase: Phase
    state: StepState
    started_at: datetime | None = None
    finished_at: datetime | None = None
    seconds: float | None = None
    """Wall-clock time the step took (0.1 s resolution): where a recovery's time went."""
    message: str = ""


class RestoreProof(_Model):
    """Rows counted in every restored table against what the dump carries (logical restores;
    `cluster.restore_proof`). Only tables whose counts matched are counted here."""

    databases: int = 0
    tables: int = 0
    rows: int = 0
    verified_on: tuple[str, ...] = ()
    """Nodes where every table held exactly the rows of the dump (the primary first)."""
    nodes: int = 0
    """Nodes of the cluster (verified_on covers all of them once the standbys are proven)."""
    not_verified: tuple[str, ...] = ()
    """What the proof could not count, with the reason (never counted as verified)."""
    restore_lsn: str | None = None
    """The primary's WAL position at the end of the restore; standbys replayed past it."""
    seconds: dict[str, float] = Field(default_factory=dict)
    """Time the counts took per node."""


class RecoveryStatus(_Model):
    phase: Phase = Phase.PENDING
    conditions: tuple[Condition, ...] = ()
    observed_generation: int | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    message: str = ""
    failure_reason: str | None = None
    backup: BackupInfo = Field(default_factory=BackupInfo)
    progress: Progress = Field(default_factory=Progress)
    primary: str | None = None
    nodes: tuple[NodeState, ...] = ()
    steps: tuple[StepRecord, ...] = ()
    # Free-form facts that steps need to resume (e.g. staged file path); values are plain
    # strings/numbers, never secrets.
    facts: dict[str, str] = Field(default_factory=dict)
    restore_proof: RestoreProof | None = None
    phase_started_at: datetime | None = None
    phase_durations: dict[str, float] = Field(default_factory=dict)
    # The spec as accepted at start. A started recovery keeps it (only `confirm` may change
    # later), so a GitOps edit cannot retarget a half-done recovery.
    accepted_spec: dict[str, Any] | None = None

    # ------------------------------------------------------------------ I/O shape

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape for the Kubernetes status (camelCase, no nulls)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> RecoveryStatus:
        return cls.model_validate(raw or {})

    # ------------------------------------------------------------------ reads

    def condition(self, type_: ConditionType) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)

    def is_true(self, type_: ConditionType) -> bool:
        cond = self.condition(type_)
        return cond is not None and cond.status == "True"

    @property
    def finished(self) -> bool:
        """No more work will run: Failed, Succeeded, or a completed dry run."""
        blocked = self.condition(ConditionType.BLOCKED)
        dry_run_done = (
            blocked is not None
            and blocked.status == "True"
            and (blocked.reason == "DryRunComplete")
        )
        return self.phase is Phase.FAILED or self.is_true(ConditionType.SUCCEEDED) or dry_run_done

    def step(self, name: str) -> StepRecord | None:
        return next((s for s in self.steps if s.name == name), None)


def now_utc() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def step_clock() -> datetime:
    """Now, to the millisecond: step records carry sub-second times, since most steps take
    less than a second and their durations are what an operator tunes by."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def _clip(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 1] + "…"


# ---------------------------------------------------------------------- conditions


def set_condition(
    status: RecoveryStatus,
    type_: ConditionType,
    value: bool,
    reason: str,
    message: str,
    now: datetime,
) -> RecoveryStatus:
    """Set one condition; lastTransitionTime moves only when the True/False value changes."""
    text = "True" if value else "False"
    old = status.condition(type_)
    moved = old is None or old.status != text
    new = Condition(
        type=type_,
        status=text,
        reason=reason,
        message=_clip(message),
        last_transition_time=now if moved or old is None else old.last_transition_time,
        observed_generation=status.observed_generation,
    )
    others = tuple(c for c in status.conditions if c.type != type_)
    ordered = sorted((*others, new), key=lambda c: list(ConditionType).index(c.type))
    return status.model_copy(update={"conditions": tuple(ordered)})


# ---------------------------------------------------------------------- lifecycle


def accept(
    status: RecoveryStatus, spec: dict[str, Any], generation: int | None, now: datetime
) -> RecoveryStatus:
    """A valid spec was parsed: the recovery starts with its first working phase."""
    status = status.model_copy(
        update={
            "observed_generation": generation,
            "started_at": status.started_at or now,
            "accepted_spec": spec,
        }
    )
    return enter_phase(status, Phase.FETCHING, now)


def enter_phase(status: RecoveryStatus, phase: Phase, now: datetime) -> RecoveryStatus:
    durations = dict(status.phase_durations)
    if status.phase_started_at is not None and status.phase is not phase:
        durations[status.phase.value] = (now - status.phase_started_at).total_seconds()
    status = status.model_copy(
        update={
            "phase": phase,
            "phase_started_at": now,
            "phase_durations": durations,
            "progress": Progress(last_progress_at=now),
            "message": f"{phase.value} started",
        }
    )
    status = set_condition(status, ConditionType.STALLED, False, "Progressing", "", now)
    return set_condition(
        status, ConditionType.PROGRESSING, True, f"{phase.value}", f"phase {phase.value}", now
    )


def fail(status: RecoveryStatus, reason: str, message: str, now: datetime) -> RecoveryStatus:
    """The recovery ends Failed. The phase it failed in and the steps that ran stay in status."""
    durations = dict(status.phase_durations)
    if status.phase_started_at is not None:
        durations[status.phase.value] = (now - status.phase_started_at).total_seconds()
    failed_in = status.phase
    status = status.model_copy(
        update={
            "phase": Phase.FAILED,
            "failure_reason": reason,
            "message": _clip(f"failed in {failed_in.value}: {message}"),
            "completed_at": now,
            "phase_durations": durations,
            "facts": {**status.facts, "failedInPhase": failed_in.value},
        }
    )
    status = set_condition(status, ConditionType.FAILED, True, reason, message, now)
    status = set_condition(status, ConditionType.SUCCEEDED, False, reason, message, now)
    status = set_condition(status, ConditionType.PROGRESSING, False, "Failed", message, now)
    return set_condition(status, ConditionType.STALLED, False, "Finished", "", now)


def succeed(status: RecoveryStatus, message: str, now: datetime) -> RecoveryStatus:
    durations = dict(status.phase_durations)
    if status.phase_started_at is not None:
        durations[status.phase.value] = (now - status.phase_started_at).total_seconds()
    progress = status.progress.model_copy(update={"percent": 100, "last_progress_at": now})
    status = status.model_copy(
        update={
            "message": _clip(message),
            "completed_at": now,
            "phase_durations": durations,
            "progress": progress,
        }
    )
    status = set_condition(status, ConditionType.SUCCEEDED, True, "Rejoined", message, now)
    status = set_condition(status, ConditionType.FAILED, False, "Rejoined", "", now)
    status = set_condition(status, ConditionType.PROGRESSING, False, "Finished", message, now)
    status = set_condition(status, ConditionType.BLOCKED, False, "Finished", "", now)
    return set_condition(status, ConditionType.STALLED, False, "Finished", "", now)


def block(status: RecoveryStatus, reason: str, message: str, now: datetime) -> RecoveryStatus:
    """Waiting on a person (confirm, another recovery, dry run): not failed, not progressing."""
    status = status.model_copy(update={"message": _clip(message)})
    status = set_condition(status, ConditionType.BLOCKED, True, reason, message, now)
    return set_condition(status, ConditionType.PROGRESSING, False, reason, message, now)


def unblock(status: RecoveryStatus, now: datetime) -> RecoveryStatus:
    if not status.is_true(ConditionType.BLOCKED):
        return status
    status = set_condition(status, ConditionType.BLOCKED, False, "Proceeding", "", now)
    return set_condition(
        status, ConditionType.PROGRESSING, True, status.phase.value, f"phase {status.phase}", now
    )


def reject(
    status: RecoveryStatus, reason: str, message: str, generation: int | None, now: datetime
) -> RecoveryStatus:
    """The spec is invalid: Failed before the first phase, nothing was touched."""
    status = status.model_copy(update={"observed_generation": generation})
    return fail(status, reason, message, now)


def note_spec_change_ignored(
    status: RecoveryStatus, generation: int | None, now: datetime
) -> RecoveryStatus:
    status = status.model_copy(update={"observed_generation": generation})
    return set_condition(
        status,
        ConditionType.SPEC_CHANGE_IGNORED,
        True,
        "SpecFrozenAfterStart",
        f"spec generation {generation} was ignored: a started recovery keeps the spec it "
        "started with (only spec.confirm is honoured later); create a new PgRecovery instead",
        now,
    )


# ---------------------------------------------------------------------- steps & progress


def step_started(status: RecoveryStatus, name: str, now: datetime) -> RecoveryStatus:
    record = StepRecord(name=name, phase=status.phase, state=StepState.RUNNING, started_at=now)
    steps = (*tuple(s for s in status.steps if s.name != name), record)
    return status.model_copy(
        update={"steps": steps[-MAX_STEPS:], "message": f"{status.phase.value}: {name}"}
    )


def step_finished(
    status: RecoveryStatus,
    name: str,
    now: datetime,
    *,
    state: StepState = StepState.SUCCEEDED,
    message: str = "",
) -> RecoveryStatus:
    old = status.step(name)
    started = old.started_at if old and old.started_at else now
    record = StepRecord(
        name=name,
        phase=old.phase if old else status.phase,
        state=state,
        started_at=started,
        finished_at=now,
        seconds=round(max(0.0, (now - started).total_seconds()), 1),
        message=_clip(message),
    )
    steps = tuple(record if s.name == name else s for s in status.steps)
    if old is None:
        steps = (*steps, record)
    return status.model_copy(update={"steps": steps})


def record_progress(
    status: RecoveryStatus,
    done: int,
    total: int | None,
    now: datetime,
    detail: str = "",
) -> RecoveryStatus:
    percent = None
    if total:
        percent = max(0, min(100, int(done * 100 / total)))
    progress = Progress(
        phase_bytes_done=done,
        phase_bytes_total=total,
        percent=percent,
        last_progress_at=now,
        detail=_clip(detail),
    )
    status = status.model_copy(update={"progress": progress})
    if status.is_true(ConditionType.STALLED):
        status = set_condition(status, ConditionType.STALLED, False, "ProgressResumed", "", now)
    return status


def touch(status: RecoveryStatus, now: datetime) -> RecoveryStatus:
    """Progress was made that has no byte count (a step finished, a node came up)."""
    return status.model_copy(
        update={"progress": status.progress.model_copy(update={"last_progress_at": now})}
    )


def check_stalled(status: RecoveryStatus, now: datetime, stall_after: float) -> RecoveryStatus:
    """Raise `Stalled` when a working recovery reported no progress for `stall_after` s."""
    if status.finished or status.is_true(ConditionType.BLOCKED):
        return status
    last = status.progress.last_progress_at or status.phase_started_at
    if last is None:
        return status
    idle = (now - last).total_seconds()
    if idle >= stall_after and not status.is_true(ConditionType.STALLED):
        return set_condition(
            status,
            ConditionType.STALLED,
            True,
            "NoProgress",
            f"no progress in {status.phase.value} for {int(idle)}s",
            now,
        )
    return status


def set_nodes(status: RecoveryStatus, nodes: tuple[NodeState, ...]) -> RecoveryStatus:
    primary = next((n.name for n in nodes if n.role == "primary"), status.primary)
    return status.model_copy(update={"nodes": nodes, "primary": primary})


def update_node(status: RecoveryStatus, node: NodeState) -> RecoveryStatus:
    nodes = tuple(node if n.name == node.name else n for n in status.nodes)
    if not any(n.name == node.name for n in status.nodes):
        nodes = (*nodes, node)
    return set_nodes(status, nodes)


def set_backup(status: RecoveryStatus, backup: BackupInfo) -> RecoveryStatus:
    return status.model_copy(update={"backup": backup})


def set_facts(status: RecoveryStatus, **facts: str) -> RecoveryStatus:
    return status.model_copy(update={"facts": {**status.facts, **facts}})


def set_restore_proof(status: RecoveryStatus, proof: RestoreProof) -> RecoveryStatus:
    return status.model_copy(update={"restore_proof": proof})


def proof_summary(proof: RestoreProof | None) -> str:
    """One line for messages and the final Event: what was proven, on how many nodes."""
    if proof is None:
        return ""
    text = (f"restore proven: {proof.rows} rows in {proof.tables} tables of {proof.databases} "
            f"databases, verified on {len(proof.verified_on)} of {proof.nodes} nodes")
    if proof.verified_on:
        text += f" ({', '.join(proof.verified_on)})"
    if proof.not_verified:
        text += f"; not verified: {'; '.join(proof.not_verified[:3])}"
        if len(proof.not_verified) > 3:
            text += f"; and {len(proof.not_verified) - 3} more (status.restoreProof.notVerified)"
    return text


def set_message(status: RecoveryStatus, message: str) -> RecoveryStatus:
    return status.model_copy(update={"message": _clip(message)})
