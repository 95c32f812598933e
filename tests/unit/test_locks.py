"""The one-destructive-recovery-per-deployment gate, as plain logic."""

from __future__ import annotations

import pytest

from pgrecovery.engine.locks import (
    DeploymentClaims,
    RecoveryRef,
    deployment_gate,
    inheritor_of_leftovers,
)
from pgrecovery.engine.phases import Phase

pytestmark = pytest.mark.unit


def ref(uid: str, phase: Phase = Phase.STAGING, *, deployment: str = "a9s-pg",
        finished: bool = False, started: bool = False) -> RecoveryRef:
    return RecoveryRef(uid=uid, name=f"ns/{uid}", deployment=deployment, phase=phase,
                       finished=finished, started_destructive=started)


def test_first_recovery_claims_and_second_waits_naming_it() -> None:
    claims = DeploymentClaims()
    assert deployment_gate(ref("a"), [], claims) is None
    assert deployment_gate(ref("a", Phase.RESTORING), [], claims) is None  # same holder
    blocked = deployment_gate(ref("b"), [], claims)
    assert blocked is not None
    assert blocked[0] == "DeploymentBusy"
    assert "ns/a" in blocked[1]
    claims.release("a")
    assert deployment_gate(ref("b"), [], claims) is None


def test_status_of_another_object_holds_after_a_restart() -> None:
    others = [ref("a", Phase.RESTORING, started=True)]
    blocked = deployment_gate(ref("b"), others, DeploymentClaims())  # empty claims: restarted
    assert blocked is not None
    assert "phase Restoring" in blocked[1]


@pytest.mark.parametrize(
    "other",
    [
        ref("a", Phase.STAGING, started=False),  # only waiting (confirm / this lock)
        ref("a", Phase.REJOINED, started=True, finished=True),  # done
        ref("a", Phase.DECRYPTING),  # not destructive yet
        ref("a", Phase.RESTORING, started=True, deployment="other"),  # another deployment
    ],
)
def test_waiting_finished_or_unrelated_recoveries_hold_nothing(other: RecoveryRef) -> None:
    assert deployment_gate(ref("b"), [other], DeploymentClaims()) is None


def _any(uid: str, phase: Phase, *, started: bool, finished: bool = False,
         deployment: str = "a9s-pg") -> RecoveryRef:
    return RecoveryRef(uid=uid, name=f"ns/{uid}", deployment=deployment, phase=phase,
                       finished=finished, started_destructive=False, started=started)


def test_a_deleted_recovery_leaves_its_files_to_a_running_one_of_the_deployment() -> None:
    me = _any("old", Phase.FAILED, started=True, finished=True)
    running = _any("new", Phase.DECRYPTING, started=True)
    assert inheritor_of_leftovers(me, [me, running]) == running
    # Nobody to leave them to: not started yet (Pending, Blocked before its first step), already
    # finished, another deployment, or itself.
    for other in (_any("new", Phase.PENDING, started=False),
                  _any("new", Phase.REJOINED, started=True, finished=True),
                  _any("new", Phase.RESTORING, started=True, deployment="other-pg")):
        assert inheritor_of_leftovers(me, [me, other]) is None, other
    assert inheritor_of_leftovers(me, [me]) is None
    # Deleted while it ran: its own cleanup cancels its jobs on the VMs, whoever else runs.
    running_me = _any("old", Phase.RESTORING, started=True)
    assert inheritor_of_leftovers(running_me, [running_me, running]) is None
