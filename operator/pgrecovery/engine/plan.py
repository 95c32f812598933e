"""What a recovery needs from the outside: a plan of steps per phase, and secrets.

Why this module exists: the engine decides order, gates and failure handling; *which* steps a
phase has depends on the source and target (a9s logical vs WAL-E, a9s-pg vs Dingo) and, in the
Foundation's end-to-end tests, on a test-only plan. A `PlanFactory` builds the plan for one
recovery from its spec and a `SecretSource`; the operator settings name the factory, so the
engine never imports a concrete plan and tests can inject theirs through the same door.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pgrecovery.engine.phases import Phase
from pgrecovery.engine.spec import RecoverySpec, SecretKeyRef, SecretRef
from pgrecovery.engine.status import NodeState, RecoveryStatus
from pgrecovery.engine.steps import Step
from pgrecovery.errors import ConfigurationError


class SecretSource(Protocol):
    """Reads referenced secrets (Kubernetes Secrets, or local files in local mode)."""

    async def get_key(self, ref: SecretKeyRef) -> bytes:
        """The value of one key; SecretError naming the Secret and key when absent."""
        ...

    async def get_all(self, ref: SecretRef) -> Mapping[str, bytes]:
        """Every key of a Secret; SecretError when the Secret is absent."""
        ...


class Leftovers(Protocol):
    """What a recovery keeps on the VMs and the work volume between its runs.

    After a failure it is listed in status (the next run continues from it); on deletion, or
    `pgrecovery cleanup`, it is removed. Entries are `<where>:<path> (<bytes> B)`."""

    async def find(self, status: RecoveryStatus) -> list[str]:
        """What is there now (read-only)."""
        ...

    async def remove(self, status: RecoveryStatus) -> list[str]:
        """Stop this recovery's remote work, then remove everything; returns what was removed.
        Idempotent. Raises RetryableError when a node cannot be reached."""
        ...


@dataclass
class Plan:
    """The steps of each phase for one recovery, plus what to close when it ends."""

    steps: Mapping[Phase, Sequence[Step]]
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    leftovers: Leftovers | None = None
    """None: this kind of recovery leaves nothing outside its status."""
    state_words: Mapping[str, str] = field(default_factory=dict)
    """Step name → what it did to the cluster, in words: a failure after the point of no
    return says which of these hold (`engine.supervisor`)."""
    observe_nodes: Callable[[], Awaitable[list[NodeState]]] | None = None
    """The nodes as they are now (read-only), to refresh `status.nodes` when a run fails."""

    def for_phase(self, phase: Phase) -> Sequence[Step]:
        return self.steps.get(phase, ())

    async def close(self) -> None:
        for closer in reversed(self.closers):
            await closer()


@dataclass(frozen=True)
class PlanInputs:
    """Everything a plan factory may use. `name`/`namespace` identify the recovery."""

    name: str
    namespace: str
    uid: str
    spec: RecoverySpec
    secrets: SecretSource
    work_dir: str


PlanFactory = Callable[[PlanInputs], Awaitable[Plan]]


def load_plan_factory(path: str) -> PlanFactory:
    """Import `module:function`; fail at startup (not at the first recovery) when wrong."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigurationError(f"plan factory {path!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(
            f"plan factory module {module_name!r} cannot be imported: {exc}"
        ) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigurationError(f"plan factory {path!r} is not a callable")
    return factory  # type: ignore[no-any-return]
