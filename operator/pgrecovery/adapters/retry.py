"""One retry policy for object-store calls: exponential backoff with full jitter.

Why this module exists: throttling (S3 `SlowDown`, Azure `ServerBusy`), 5xx answers and
connection resets are normal on long downloads and must not fail a recovery, but a retry loop
written at each call site drifts apart. The SDKs' own retries are turned off in our adapters
(botocore `max_attempts=1`, Azure `retry_total=0`) so that this is the only place that decides
how often and how long to wait, and so the waits can be logged and tested.

Only `RetryableError` is retried; every fatal error passes straight through.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from pgrecovery.errors import RetryableError

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry one object-store operation."""

    attempts: int = 6
    """Total tries including the first. Six tries with these delays span about a minute,
    long enough to ride out throttling bursts and a store restart, short enough that a dead
    endpoint is reported while someone is still watching."""
    base_delay: float = 0.5
    """Delay cap of the first retry in seconds; doubles each retry."""
    max_delay: float = 20.0
    """Upper bound of the delay cap."""

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        """Full-jitter delay before retry number `retry` (1-based).

        Full jitter (uniform in [0, cap]) spreads parallel range requests that failed
        together, so they do not hit a throttling store again in lockstep.
        """
        cap = min(self.max_delay, self.base_delay * (2 ** (retry - 1)))
        return (rng or random).uniform(0, cap)


NO_RETRY = RetryPolicy(attempts=1)


async def retry_async(
    operation: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    what: str,
    on_retry: Callable[[int, float, RetryableError], None] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """Run `operation` until it succeeds, fails fatally, or `policy.attempts` are used up.

    A `RetryableError` carrying its own `delay` (e.g. from `Retry-After`) is honoured when it
    is longer than the jittered delay. The last retryable error is re-raised unchanged.
    """
    attempt = 1
    while True:
        try:
            return await operation()
        except RetryableError as exc:
            if attempt >= policy.attempts:
                log.warning("%s: giving up after %d attempts: %s", what, attempt, exc)
                raise
            delay = max(policy.delay(attempt), exc.delay or 0.0)
            log.info("%s: attempt %d failed (%s); retrying in %.1fs", what, attempt, exc, delay)
            if on_retry is not None:
                on_retry(attempt, delay, exc)
            await sleep(delay)
            attempt += 1
