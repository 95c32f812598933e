"""What every plan is built on: the phase run's store client and its closing, the progress
pump, and the small step checks the plans share.

Why this module exists: the a9s-pg logical, WAL-E and Dingo plans each open the backup store
from the source description, close what they opened when the phase run ends, and push a worker
thread's progress into status. Before, WAL-E and Dingo subclassed the logical plan and imported
its private helpers to get these; now each plan *has* a `PlanBase` (or an `A9sPgCluster`, which
has one), and no plan subclasses another (issue 17).

Decisions recorded here:
- Clients open lazily: building a plan reads no secret and reaches no server (`tests/plan_steps`
  builds every plan to read its step names).
- Progress from worker threads only updates a `ProgressHolder`; one pump task per step copies it
  into status at most every `PROGRESS_PUMP_INTERVAL` seconds, never from a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from pgrecovery.adapters.objectstore import ObjectStore
from pgrecovery.backups.config import AzureLocation, S3Location
from pgrecovery.backups.stores import StoreLocation, open_store
from pgrecovery.cluster.nodes import Node
from pgrecovery.engine import status as st
from pgrecovery.engine.plan import PlanInputs
from pgrecovery.engine.spec import RecoverySpec
from pgrecovery.engine.steps import StepContext
from pgrecovery.errors import FatalError

# Progress is pushed into status at most this often.
PROGRESS_PUMP_INTERVAL = 1.0


def fact_recorded(name: str) -> Callable[[StepContext], Awaitable[bool]]:
    """The check of a step that records fact `name` when it is done."""

    async def check(ctx: StepContext) -> bool:
        return name in ctx.status.facts

    return check


def target_nodes(spec: RecoverySpec) -> tuple[Node, ...]:
    """The VMs `target.nodes` names; none yet with `target.bosh`: the director lists them
    when they are first reached (`bosh_access`), and they are pinned in status."""
    if spec.target.bosh is not None:
        return ()
    node_specs, ssh = spec.target.require_nodes()
    return tuple(Node(name=n.name, address=n.address, port=ssh.port) for n in node_specs)


@dataclass
class ProgressHolder:
    done: int = 0
    total: int | None = None
    detail: str = ""
    changed: bool = False

    def set(self, done: int, total: int | None, detail: str) -> None:
        self.done, self.total, self.detail, self.changed = done, total, detail, True


@contextlib.asynccontextmanager
async def pumping(ctx: StepContext, holder: ProgressHolder) -> AsyncIterator[ProgressHolder]:
    """Copy `holder` into status every PROGRESS_PUMP_INTERVAL while the block runs."""

    async def pump() -> None:
        while True:
            await asyncio.sleep(PROGRESS_PUMP_INTERVAL)
            if holder.changed:
                holder.changed = False
                await ctx.progress(holder.done, holder.total, holder.detail)

    task = asyncio.create_task(pump(), name="pgrecovery-progress-pump")
    try:
        yield holder
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if holder.changed:
            await ctx.progress(holder.done, holder.total, holder.detail)


@dataclass(kw_only=True)
class PlanBase:
    """One phase run's inputs and the clients it opened (closed by `close`, the plan's
    closer, in reverse order)."""

    inputs: PlanInputs
    _store: ObjectStore | None = None
    _closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    @property
    def spec(self) -> RecoverySpec:
        return self.inputs.spec

    @property
    def work_dir(self) -> Path:
        return Path(self.inputs.work_dir)

    def on_close(self, closer: Callable[[], Awaitable[None]]) -> None:
        self._closers.append(closer)

    async def close(self) -> None:
        for closer in reversed(self._closers):
            with contextlib.suppress(Exception):
                await closer()

    async def say(self, ctx: StepContext, text: str) -> None:
        await ctx.update(lambda s: st.set_message(s, text))

    @property
    def location(self) -> StoreLocation:
        """Where `spec.source` says the backups are (S3 or Azure, with its prefix)."""
        source = self.spec.source
        if source.s3 is not None:
            return S3Location(bucket=source.s3.bucket, region=source.s3.region,
                              endpoint=source.s3.endpoint, prefix=source.s3.prefix)
        if source.azure is not None:
            return AzureLocation(container=source.azure.container,
                                 account_url=source.azure.account_url)
        raise FatalError("no backup store configured", reason="InvalidSpec")  # the model

    async def store(self) -> ObjectStore:
        """The backup store `spec.source` describes, with the credentials of its Secret."""
        if self._store is None:
            source = self.spec.source
            ref = source.s3.credentials_secret_ref if source.s3 is not None else (
                source.azure.credentials_secret_ref if source.azure is not None else None)
            values = await self.inputs.secrets.get_all(ref) if ref is not None else None
            where = f"Secret {ref.name}" if ref is not None else "the default credentials"
            self._store = await open_store(self.location, values, where)
            self.on_close(self._store.close)
        return self._store
