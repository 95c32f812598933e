"""One executor per recovery across operator replicas: claim, keep renewing, stop when lost.

Why this module exists: the supervisor guards one process; with `replicas > 1` two processes
could run steps of the same recovery at once (kopf peering is not a lock). The handlers claim
the recovery's lease before they start or poll a phase, and before a deletion cleans up; while
this process holds it, a renewal task keeps it alive; if renewing fails for most of a lease
duration (the API server unreachable, or another replica took it), the local work is stopped
at once — before the other replica may take over, one whole duration after the last renewal.

The lease itself (a Kubernetes Lease, written with optimistic concurrency) is an adapter; this
module is the policy and knows only the small `LeaseClient` protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

log = logging.getLogger(__name__)


class LeaseOutcome(Protocol):
    @property
    def held(self) -> bool: ...

    @property
    def holder(self) -> str: ...

    @property
    def took_over(self) -> bool: ...


class LeaseClient(Protocol):
    duration: float

    async def acquire(self, namespace: str, name: str) -> LeaseOutcome:
        """Take or renew; raises RetryableError when the API cannot be asked."""
        ...

    async def release(self, namespace: str, name: str) -> None: ...


def lease_name(uid: str) -> str:
    return f"pgrecovery-{uid}"


class ExecutorGuard:
    """Claims per recovery (by uid); `on_lost(uid)` stops the local work of a lost claim."""

    def __init__(self, client: LeaseClient, on_lost: Callable[[str], Awaitable[None]]) -> None:
        self._client = client
        self._on_lost = on_lost
        self._renewers: dict[str, asyncio.Task[None]] = {}

    @property
    def identity(self) -> str:
        return str(getattr(self._client, "identity", "?"))

    async def claim(self, namespace: str, uid: str) -> str | None:
        """None when this process executes the recovery (now renewing it); else the holder."""
        renewer = self._renewers.get(uid)
        if renewer is not None and not renewer.done():
            return None  # held and kept alive by the renewer: no API call per poll
        outcome = await self._client.acquire(namespace, lease_name(uid))
        if not outcome.held:
            return outcome.holder
        if outcome.took_over:
            log.warning("took over the executor lease of recovery %s from a replica that "
                        "stopped renewing it", uid)
        log.info("this replica (%s) executes recovery %s", self.identity, uid)
        self._renewers[uid] = asyncio.create_task(
            self._renew(namespace, uid), name=f"pgrecovery-lease:{uid}")
        return None

    async def drop(self, namespace: str, uid: str) -> None:
        """The recovery has ended (or is deleted): stop renewing, release the lease."""
        task = self._renewers.pop(uid, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._client.release(namespace, lease_name(uid))

    async def close(self) -> None:
        """Operator shutdown: stop renewing; the leases expire (a restart renews its own)."""
        for task in self._renewers.values():
            task.cancel()
        for task in list(self._renewers.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._renewers.clear()

    async def _renew(self, namespace: str, uid: str) -> None:
        duration = self._client.duration
        # Renew three times per duration; give up (and stop the work) when two thirds of a
        # duration passed without a successful renewal: the rest is the margin for stopping.
        interval, give_up = duration / 3, duration * 2 / 3
        last_ok = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            try:
                outcome = await self._client.acquire(namespace, lease_name(uid))
                if outcome.held:
                    last_ok = time.monotonic()
                    continue
                why = f"the lease is now held by {outcome.holder}"
            except Exception as exc:  # noqa: BLE001 - any failure counts against the margin
                if time.monotonic() - last_ok < give_up:
                    log.warning("renewing the executor lease of %s failed (%s); retrying",
                                uid, exc)
                    continue
                why = f"the lease could not be renewed for {give_up:.0f}s ({exc})"
            log.error("stopping the work on recovery %s here: %s", uid, why)
            self._renewers.pop(uid, None)
            await self._on_lost(uid)
            return
