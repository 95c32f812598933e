"""Breakpoints: stop a running phase at a named point until someone lets it go.

Why this module exists: the kill walk (tests/e2e/test_operator_kill_walk.py) SIGKILLs the
operator at every step boundary. Finding those moments by polling status worked only while every
step lasted longer than a status write; a step of 0.1 s, or a restore that ends inside the first
long poll, passed unseen on some machines and not on others. A breakpoint makes the moment
deterministic: the runner calls `reach("before-<step>")` before each step, and when that
breakpoint is armed the phase waits there, having said so, until it is released (or the process
is killed, which is the point).

Mechanism: a directory (`PGRECOVERY_BREAKPOINT_DIR`, unset in production: then `reach` returns
at once and touches nothing). `<name>.hold` arms a breakpoint; on reaching it the engine writes
`<name>.reached` (atomically, with its PID) and waits while `<name>.hold` exists. Files, not an
API, because the thing that sets and clears them (a test) must work across operator restarts,
and a file survives the process it stops.

Names are `[a-z0-9.-]+` (step names are), so a name is always a plain file name.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{0,120}$")

# How often a held breakpoint looks for its release: a test waits on it, 20 ms is invisible.
RELEASE_POLL_SECONDS = 0.02


@dataclass(frozen=True)
class Breakpoints:
    """Named stopping points; `directory=None` (production) makes every `reach` a no-op."""

    directory: Path | None = None

    def _hold(self, name: str) -> Path | None:
        if self.directory is None:
            return None
        hold = self.directory / f"{_checked(name)}.hold"
        return hold if hold.exists() else None

    def armed(self, name: str) -> bool:
        return self._hold(name) is not None

    async def reach(self, name: str) -> None:
        """Wait here while breakpoint `name` is armed; say so in `<name>.reached` first."""
        hold = self._hold(name)
        if hold is None:
            return
        reached = hold.with_name(f"{name}.reached")
        tmp = reached.with_name(f".{reached.name}.{os.getpid()}")
        tmp.write_text(f"{os.getpid()}\n")
        tmp.replace(reached)
        log.info("breakpoint %s reached; waiting until %s is removed", name, hold)
        # A file removed by another process has no event to wait on: poll it.
        while hold.exists():  # noqa: ASYNC110
            await asyncio.sleep(RELEASE_POLL_SECONDS)
        log.info("breakpoint %s released", name)


NO_BREAKPOINTS = Breakpoints()


def before_step(step: str) -> str:
    """The breakpoint the runner reaches before step `step` (its check and apply)."""
    return f"before-{step}"


def _checked(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"invalid breakpoint name {name!r}")
    return name
