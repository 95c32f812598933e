"""`kopf run -m tests.e2e.freezable_operator`: the real operator, plus a test-only way to block
its event loop (tests/e2e/test_operator_liveness.py).

Why this module exists: the liveness probe must fail when the event loop is blocked, and the
only convincing proof blocks the loop of a real `kopf run`. SIGUSR1 runs the handler below on
the main thread — the event loop's thread — and it sleeps with `time.sleep` for
PGRECOVERY_TEST_FREEZE_SECONDS: the loop is blocked exactly as by a hanging synchronous call,
while other threads (the metrics server) keep running. Nothing of this is in the product.
"""

from __future__ import annotations

import os
import signal
import time
from types import FrameType

import pgrecovery.main  # noqa: F401 - importing registers the operator's handlers


def _freeze(_signum: int, _frame: FrameType | None) -> None:
    time.sleep(float(os.environ.get("PGRECOVERY_TEST_FREEZE_SECONDS", "20")))


signal.signal(signal.SIGUSR1, _freeze)
