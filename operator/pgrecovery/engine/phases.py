"""The phase machine of a recovery, as data.

Why this module exists: the order of phases, which of them are destructive and which are
terminal is decided in exactly one place. Handlers, the local runner, status functions and
metrics all read this table instead of hand-tracking the order (crate-operator's mistake).
"""

from __future__ import annotations

from enum import StrEnum


class Phase(StrEnum):
    """The `status.phase` values of a PgRecovery, in the order a recovery walks them."""

    PENDING = "Pending"
    FETCHING = "Fetching"
    DECRYPTING = "Decrypting"
    STAGING = "Staging"
    RESTORING = "Restoring"
    REJOINED = "Rejoined"
    FAILED = "Failed"


#: The one transition table: the phase that follows a phase that finished its work.
#: `Rejoined` is reached as a working phase (rejoin the standbys) and stays as the success
#: terminal once its steps are done (`Succeeded` condition True).
NEXT_PHASE: dict[Phase, Phase] = {
    Phase.PENDING: Phase.FETCHING,
    Phase.FETCHING: Phase.DECRYPTING,
    Phase.DECRYPTING: Phase.STAGING,
    Phase.STAGING: Phase.RESTORING,
    Phase.RESTORING: Phase.REJOINED,
}

#: Phases whose steps run work; `Pending` only validates and moves on.
WORKING_PHASES: tuple[Phase, ...] = (
    Phase.FETCHING,
    Phase.DECRYPTING,
    Phase.STAGING,
    Phase.RESTORING,
    Phase.REJOINED,
)

#: Phases that change the cluster. Nothing here starts before every check has passed,
#: `spec.confirm` matches, `dryRun` is off, and no other recovery holds the deployment.
DESTRUCTIVE_PHASES: frozenset[Phase] = frozenset({Phase.STAGING, Phase.RESTORING, Phase.REJOINED})

#: Only `Failed` is terminal by phase alone; `Rejoined` is terminal once `Succeeded` is True
#: (see `status.is_finished`), because Rejoined is also the phase in which standbys rejoin.
TERMINAL_PHASES: frozenset[Phase] = frozenset({Phase.FAILED})


def next_phase(phase: Phase) -> Phase | None:
    """The phase after `phase`, or None when `phase` is the last one or terminal."""
    return NEXT_PHASE.get(phase)


def is_destructive(phase: Phase) -> bool:
    return phase in DESTRUCTIVE_PHASES


def phase_index(phase: Phase) -> int:
    """Position in the walk (Pending = 0 … Rejoined = 5); Failed sorts last."""
    order = [Phase.PENDING, *WORKING_PHASES, Phase.FAILED]
    return order.index(phase)
