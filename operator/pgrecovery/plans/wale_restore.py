"""Restoring of a point-in-time recovery: PostgreSQL stopped on the primary, its data directory
set aside or wiped, the base backup unpacked, recovery to the target configured, replay watched
until promotion, the recovery settings removed; and, in Rejoined, what it staged removed.

Why this module exists: the physical restore of the WAL-E plan, apart from the archive and WAL
steps so each reads on its own (issue 17).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pgrecovery.backups.progress import human_size
from pgrecovery.backups.wale import lzop
from pgrecovery.backups.wale.layout import Segment, format_lsn, segno_of
from pgrecovery.cluster.a9s import StepResult
from pgrecovery.cluster.nodes import Node
from pgrecovery.cluster.physical import PhysicalOperations, ReplayState
from pgrecovery.engine import status as st
from pgrecovery.engine.steps import FunctionStep, Step, StepContext
from pgrecovery.plans.base import ProgressHolder, pumping

if TYPE_CHECKING:
    from pgrecovery.plans.wale_physical import WalePhysicalRecovery

log = logging.getLogger(__name__)


async def blocks_async(path: Path, what: str) -> AsyncIterator[bytes]:
    """Decoded lzop blocks of a local file, decoded in a worker thread."""
    it = lzop.decode_file(path, what)
    while True:
        block = await asyncio.to_thread(next, it, None)
        if block is None:
            return
        yield block


@dataclass
class PhysicalRestore:
    """The Restoring steps of the recovery `recovery` (its pinned backup, parts and cluster)."""

    recovery: WalePhysicalRecovery


    def phys_step(self, name: str,
                  op: Callable[[PhysicalOperations, Node, str], Awaitable[StepResult]],
                  done_fact: str | None = None) -> Step:
        async def check(ctx: StepContext) -> bool:
            return done_fact is not None and done_fact in ctx.status.facts

        async def apply(ctx: StepContext) -> None:
            phys = await self.recovery.phys(ctx)
            result = await op(phys, self.recovery.view(ctx).primary, self.recovery.run_id(ctx))
            if done_fact is not None:
                await ctx.fact(**{done_fact: result.message[:200]})
            await self.recovery.note(ctx, result)

        return FunctionStep(name, check, apply, verify_after=False)

    async def replace_data_dir(self, ctx: StepContext) -> None:
        phys = await self.recovery.phys(ctx)
        keep = ctx.status.facts.get("keepOldData") == "true"
        run_id = self.recovery.run_id(ctx)
        if keep:
            # Written first: if anything later fails, the status says where the old data is.
            await ctx.fact(oldDataDir=phys.old_data_dir(run_id))
        primary = self.recovery.view(ctx).primary
        await self.recovery.note(ctx, await phys.ensure_data_dir_replaced(primary, run_id,
                                                                          keep_old=keep))

    async def extract_base_backup(self, ctx: StepContext) -> None:
        backup = await self.recovery.pinned_backup(ctx)
        phys = await self.recovery.phys(ctx)
        primary = self.recovery.view(ctx).primary
        run_id = self.recovery.run_id(ctx)
        total = int(ctx.status.facts.get("expandedBytes", "0")) or None
        holder = ProgressHolder(total=total)
        base = [0]

        async with pumping(ctx, holder):
            for index, part in enumerate(backup.parts):
                def on_bytes(n: int, index: int = index) -> None:
                    holder.set(base[0] + n, total,
                               f"extracting partition {index + 1}/{len(backup.parts)}: "
                               f"{human_size(base[0] + n)} of {human_size(total or 0)} into "
                               f"{self.recovery.layout.data_dir}")

                counter = _Counted(blocks_async(self.recovery.part_path(backup, index), part.key))
                await phys.ensure_partition_extracted(primary, run_id, index, counter.chunks(),
                                                      on_bytes)
                base[0] += counter.size
        await ctx.fact(baseBackupExtracted=str(base[0]))

    async def extracted(self, ctx: StepContext) -> bool:
        return "baseBackupExtracted" in ctx.status.facts

    async def configure_recovery(self, ctx: StepContext) -> None:
        phys = await self.recovery.phys(ctx)
        target_text = ctx.status.facts.get("recoveryTarget", "")
        target = None if target_text in ("", "end of archive") else \
            datetime.fromisoformat(target_text)
        result = await phys.ensure_recovery_configured(self.recovery.view(ctx).primary,
                                                       self.recovery.run_id(ctx), target)
        await ctx.fact(recoveryConfigured="true")
        await self.recovery.note(ctx, result)

    async def recovery_configured(self, ctx: StepContext) -> bool:
        # Never write recovery.signal again once replay started: a promoted primary would
        # go back into recovery.
        return "recoveryConfigured" in ctx.status.facts

    async def wait_promotion(self, ctx: StepContext) -> None:
        phys = await self.recovery.phys(ctx)
        primary = self.recovery.view(ctx).primary
        segments = ctx.status.facts["walSegments"].split(",")
        first = Segment.parse(segments[0]).segno
        needed = len(segments)
        end_lsn = ctx.status.facts.get("walEndLsn", "")

        async def on_state(state: ReplayState) -> None:
            if state.replay_lsn is None:
                return
            replayed = max(0, min(needed, segno_of(state.replay_lsn) - first + 1))
            when = state.last_xact_time.isoformat() if state.last_xact_time else "none yet"
            await ctx.progress(
                replayed, needed,
                f"WAL replayed: segment {replayed} of {needed}, LSN "
                f"{format_lsn(state.replay_lsn)} (needed up to {end_lsn}); last transaction "
                f"{when}",
            )

        timeout = 1800.0 + needed * 1.0
        state = await phys.wait_promoted(primary, on_state=on_state, timeout=timeout,
                                         raise_if_cancelled=ctx.raise_if_cancelled)
        reached = state.last_xact_time.isoformat() if state.last_xact_time else ""
        await ctx.fact(reachedTime=reached,
                       reachedLsn=format_lsn(state.replay_lsn) if state.replay_lsn else "",
                       timeline=str(state.timeline or ""))
        target = ctx.status.facts.get("targetTime", "")
        mode = ctx.status.facts.get("recoveryTarget", "")
        if target and mode == "end of archive":
            text = (f"target {target} lies beyond the archive (bestEffort): recovered to the "
                    f"last archived transaction at {reached or 'unknown'}")
        elif target:
            text = f"recovered to {reached or 'unknown'} (target {target})"
        else:
            text = f"recovered to the end of the archive: last transaction {reached}"
        text = f"{text}; promoted on timeline {state.timeline}"
        # The final status message is the supervisor's; the point reached stays in facts.
        await ctx.fact(reachedPoint=text)
        await ctx.update(lambda s: st.set_message(s, text))

    async def promoted(self, ctx: StepContext) -> bool:
        return "reachedLsn" in ctx.status.facts

    async def leftovers_removed(self, ctx: StepContext) -> None:
        phys = await self.recovery.phys(ctx)
        primary, run_id = self.recovery.view(ctx).primary, self.recovery.run_id(ctx)
        await self.recovery.note(ctx, await phys.ensure_leftovers_removed(primary, run_id))


class _Counted:
    """Counts the bytes an async stream has yielded (a skipped partition yields none)."""

    def __init__(self, source: AsyncIterator[bytes]) -> None:
        self.source = source
        self.size = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self.source:
            self.size += len(chunk)
            yield chunk
