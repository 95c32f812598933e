"""Decisions about a recovery as a whole: accept or reject a spec, which spec is in force.

Why this module exists: "a completed or failed PgRecovery never runs again", "spec changes after
start are ignored, visibly", "only `confirm` may change later" are rules about the resource's
life, not about any phase. They are pure functions of (raw spec, status), so the kopf handlers
and the local runner apply the same rules and tests check them without Kubernetes.
"""

from __future__ import annotations

from typing import Any

from pgrecovery.engine import status as st
from pgrecovery.engine.spec import RecoverySpec, parse_spec
from pgrecovery.engine.status import RecoveryStatus
from pgrecovery.errors import InvalidSpec

# Fields a user may change after the recovery started. `confirm` is how a person lets the
# destructive phases run after reading the Fetching/Decrypting report.
MUTABLE_AFTER_START = frozenset({"confirm"})


def accept_or_reject(
    raw_spec: dict[str, Any], status: RecoveryStatus, generation: int | None
) -> RecoveryStatus:
    """New resource: parse the spec; valid → Fetching, invalid → Failed naming the field."""
    now = st.now_utc()
    if status.started_at is not None or status.finished:
        return status  # already accepted (e.g. the create handler ran twice): no second run
    try:
        parse_spec(raw_spec)
    except InvalidSpec as exc:
        return st.reject(status, exc.reason, str(exc), generation, now)
    return st.accept(status, _frozen(raw_spec), generation, now)


def effective_spec(raw_spec: dict[str, Any], status: RecoveryStatus) -> RecoverySpec:
    """The spec in force: as accepted, with only the mutable fields taken from `raw_spec`."""
    base = dict(status.accepted_spec or raw_spec)
    for name in MUTABLE_AFTER_START:
        if name in raw_spec:
            base[name] = raw_spec[name]
        else:
            base.pop(name, None)
    return parse_spec(base)


def spec_change(
    raw_spec: dict[str, Any], status: RecoveryStatus, generation: int | None
) -> RecoveryStatus:
    """A spec edit after start: note it as ignored unless it touched only mutable fields."""
    if status.accepted_spec is None:
        return status
    if _frozen(raw_spec) == _frozen(status.accepted_spec):
        return status.model_copy(update={"observed_generation": generation})
    return st.note_spec_change_ignored(status, generation, st.now_utc())


def _frozen(raw_spec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in raw_spec.items() if k not in MUTABLE_AFTER_START}
