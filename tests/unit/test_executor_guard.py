"""The executor guard: claims, renews, stops the local work when the lease is lost."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from pgrecovery.engine.executor import ExecutorGuard, lease_name
from pgrecovery.errors import RetryableError

pytestmark = pytest.mark.unit


@dataclass(frozen=True)
class Outcome:
    held: bool
    holder: str
    took_over: bool = False


@dataclass
class FakeLeases:
    duration: float = 0.3
    identity: str = "me"
    holder: str = "me"
    failing: bool = False
    calls: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)

    async def acquire(self, namespace: str, name: str) -> Outcome:
        self.calls.append(name)
        if self.failing:
            raise RetryableError("API down")
        return Outcome(self.holder == self.identity, self.holder)

    async def release(self, namespace: str, name: str) -> None:
        self.released.append(name)


async def test_a_claim_renews_without_a_call_per_poll_and_drop_releases() -> None:
    leases, lost = FakeLeases(), []

    async def on_lost(uid: str) -> None:
        lost.append(uid)

    guard = ExecutorGuard(leases, on_lost)
    assert await guard.claim("ns", "u1") is None
    assert await guard.claim("ns", "u1") is None  # the renewer holds it: no API call
    assert leases.calls == [lease_name("u1")]
    await asyncio.sleep(leases.duration * 1.2)  # renewals every third of a duration
    assert len(leases.calls) >= 3
    await guard.drop("ns", "u1")
    assert leases.released == [lease_name("u1")]
    assert lost == []


async def test_someone_else_holding_is_reported_and_nothing_runs() -> None:
    leases = FakeLeases(holder="other")
    guard = ExecutorGuard(leases, lambda uid: asyncio.sleep(0))
    assert await guard.claim("ns", "u1") == "other"
    await guard.close()


@pytest.mark.parametrize("how", ["taken", "unreachable"])
async def test_a_lost_lease_stops_the_local_work_within_two_thirds_of_a_duration(
    how: str,
) -> None:
    leases, lost = FakeLeases(), []

    async def on_lost(uid: str) -> None:
        lost.append(uid)

    guard = ExecutorGuard(leases, on_lost)
    assert await guard.claim("ns", "u1") is None
    if how == "taken":
        leases.holder = "other"
    else:
        leases.failing = True
    started = asyncio.get_running_loop().time()
    while not lost and asyncio.get_running_loop().time() - started < 2.0:
        await asyncio.sleep(0.01)
    assert lost == ["u1"]
    # Given up at two thirds of a duration at the earliest, at the next renewal after it.
    elapsed = asyncio.get_running_loop().time() - started
    assert elapsed < leases.duration * 1.5, elapsed
    # Lost for good: the next claim asks the API again (and sees the other holder).
    leases.failing, leases.holder = False, "other"
    assert await guard.claim("ns", "u1") == "other"
    await guard.close()
