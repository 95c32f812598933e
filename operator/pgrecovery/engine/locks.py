"""One destructive recovery per deployment at a time.

Why this module exists: two PgRecovery objects for the same BOSH deployment (a GitOps commit
applied twice under different names, two people at once) must never stop standbys, restore and
re-clone concurrently. Two walls, both here as plain logic:

1. What the cluster says: another unfinished recovery of the same deployment that has started
   destructive work (a step of a destructive phase in its status, from the operator's index of
   all PgRecovery objects) holds it. This survives operator restarts, because it is read from
   the objects' status. A recovery merely *waiting* in Staging (for confirm, or for this very
   lock) holds nothing — otherwise two waiting recoveries would block each other forever.
2. What this process decided: a claim taken the moment a recovery passes the gate, so two
   recoveries reaching Staging in the same second cannot both pass before either's status shows
   it (only one operator replica is active; see the Helm chart's peering notes).

The waiting recovery is Blocked with reason DeploymentBusy naming the holder.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pgrecovery.engine.phases import Phase, is_destructive


@dataclass(frozen=True)
class RecoveryRef:
    """What the index knows about one PgRecovery object."""

    uid: str
    name: str  # namespace/name
    deployment: str
    phase: Phase
    finished: bool
    started_destructive: bool
    """A step of a destructive phase has started (recorded in status.steps)."""
    started: bool = False
    """Any step has started: from Decrypting on, the recovery uses the VMs' files."""


class DeploymentClaims:
    """In-process claims: deployment → the uid and name of the recovery holding it."""

    def __init__(self) -> None:
        self._by_deployment: dict[str, tuple[str, str]] = {}

    def holder(self, deployment: str) -> tuple[str, str] | None:
        return self._by_deployment.get(deployment)

    def claim(self, deployment: str, uid: str, name: str) -> str | None:
        """Claim `deployment` for `uid`; the holder's name when someone else has it."""
        held = self._by_deployment.get(deployment)
        if held is not None and held[0] != uid:
            return held[1]
        self._by_deployment[deployment] = (uid, name)
        return None

    def release(self, uid: str) -> None:
        for deployment, (holder, _name) in list(self._by_deployment.items()):
            if holder == uid:
                del self._by_deployment[deployment]


def busy_with(me: RecoveryRef, others: Iterable[RecoveryRef]) -> RecoveryRef | None:
    """Another unfinished recovery of `me.deployment` that has started destructive work."""
    for other in others:
        if other.uid == me.uid or other.deployment != me.deployment or other.finished:
            continue
        if is_destructive(other.phase) and other.started_destructive:
            return other
    return None


def inheritor_of_leftovers(me: RecoveryRef, others: Iterable[RecoveryRef]) -> RecoveryRef | None:
    """Another unfinished recovery of `me.deployment` that has started: it works with the same
    files on the VMs (the staged dump it may have re-used, the state directory its own job
    records live in), so deleting `me` must leave them to it. Whatever it ends as, those files
    go with it: its success step removes everything pgrecovery has on the VMs, and a failure
    lists them in its status for its own deletion.

    Only a finished `me` hands over: one deleted while it ran still has jobs on the VMs (a
    restore, a clone) that its own cleanup must cancel and settings it must put back."""
    if not me.finished:
        return None
    for other in others:
        if other.uid != me.uid and other.deployment == me.deployment and not other.finished \
                and other.started:
            return other
    return None


def deployment_gate(
    me: RecoveryRef, others: Iterable[RecoveryRef], claims: DeploymentClaims
) -> tuple[str, str] | None:
    """None when `me` may run destructive work now, else (reason, message) for Blocked."""
    other = busy_with(me, others)
    holder = other.name if other is not None else claims.claim(me.deployment, me.uid, me.name)
    if holder is None:
        return None
    phase = f" (phase {other.phase.value})" if other is not None else ""
    return (
        "DeploymentBusy",
        f"deployment {me.deployment!r} is being recovered by PgRecovery {holder}{phase}; "
        "this recovery waits until that one has finished",
    )
