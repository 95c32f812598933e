"""What `/healthz` (the liveness probe) answers: whether the operator still does its work.

Why this module exists: kopf runs every handler on one asyncio event loop and learns of every
change through its watch of PgRecovery objects. A process whose loop is blocked (a synchronous
call that hangs, a deadlock in a library) or whose watch no longer delivers events is alive to
the kernel and still answers `/metrics` from its own thread — and does nothing: recoveries stop
without a word. The probe must fail then, so the kubelet restarts the pod and the recoveries
resume from their status.

Two signals, both produced on the event loop and only read by the metrics thread (which keeps
answering while the loop is blocked, so the probe gets a 503 with a reason, not a timeout):

- a heartbeat the loop writes every `BEAT_INTERVAL`: older than `LOOP_STALL_AFTER` → the loop
  is blocked;
- the polls of the running phases (`Supervisor.overdue`): kopf calls a phase's handler again
  every PGRECOVERY_POLL_INTERVAL seconds, and it does so only when its watch delivers the
  object's own "touch" patch. A running phase not polled for `POLL_OVERDUE_AFTER` → the watch
  (or kopf's worker for the object) is dead.

kopf's own `--liveness` endpoint runs on the event loop: a blocked loop only makes it time out,
and it would need a second port; `@kopf.on.probe` handlers cannot see a dead watch either.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

# The loop writes the heartbeat every second; anything on the loop that blocks it for 15 s is
# a fault (handlers never sleep, SDK calls go through threads). With the chart's probe (every
# 20 s, 3 failures) a pod is restarted after its loop was blocked for about 75 s.
BEAT_INTERVAL = 1.0
LOOP_STALL_AFTER = 15.0
# A running phase is polled every PGRECOVERY_POLL_INTERVAL (2 s by default; the chart's values
# allow up to 60 s), plus kopf's consistency wait (5 s): two minutes without a poll is no delay.
POLL_OVERDUE_AFTER = 120.0


class Liveness:
    """The heartbeat task (`run`, on the event loop) and the verdict (`verdict`, any thread)."""

    def __init__(
        self,
        overdue: Callable[[float], list[str]],
        *,
        beat_interval: float = BEAT_INTERVAL,
        loop_stall_after: float = LOOP_STALL_AFTER,
        poll_overdue_after: float = POLL_OVERDUE_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._find_overdue = overdue
        self._beat_interval = beat_interval
        self._loop_stall_after = loop_stall_after
        self._poll_overdue_after = poll_overdue_after
        self._clock = clock
        # Written on the loop, read by the metrics thread: a float and a tuple, each replaced
        # whole (an atomic reference swap), never mutated in place.
        self._beat_at = clock()
        self._overdue: tuple[str, ...] = ()

    def beat(self) -> None:
        self._beat_at = self._clock()
        self._overdue = tuple(self._find_overdue(self._poll_overdue_after))

    async def run(self) -> None:
        """Beat until cancelled (at the operator's cleanup)."""
        while True:
            self.beat()
            await asyncio.sleep(self._beat_interval)

    def verdict(self) -> tuple[bool, str]:
        """(healthy, why): for the probe's status code and body."""
        age = self._clock() - self._beat_at
        if age > self._loop_stall_after:
            return False, (
                f"event loop blocked: no heartbeat for {age:.0f}s "
                f"(limit {self._loop_stall_after:.0f}s)"
            )
        overdue = self._overdue
        if overdue:
            return False, (
                f"watch dead: running recoveries not polled for more than "
                f"{self._poll_overdue_after:.0f}s: {', '.join(overdue)}"
            )
        return True, "ok"
