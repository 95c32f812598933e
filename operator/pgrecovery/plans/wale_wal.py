"""The WAL of a point-in-time recovery: fetched from the archive and verified in Fetching
(continuity, each segment's system identifier, a transaction past the target), the disk space
planned, and staged decompressed on the primary in Decrypting.

Why this module exists: the WAL half of the WAL-E plan, apart from the base backup and the
physical restore so each reads on its own (issue 17).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pgrecovery import metrics
from pgrecovery.backups.progress import human_size
from pgrecovery.backups.wale import lzop
from pgrecovery.backups.wale.fetch import download, fetch_wal, local_name
from pgrecovery.backups.wale.layout import WAL_SEGMENT_SIZE, format_lsn, segno_of
from pgrecovery.backups.wale.planning import last_segment
from pgrecovery.engine import status as st
from pgrecovery.engine.steps import StepContext
from pgrecovery.errors import BackupNotFound, FatalError
from pgrecovery.plans.base import ProgressHolder, pumping
from pgrecovery.plans.wale_restore import blocks_async

if TYPE_CHECKING:
    from pgrecovery.plans.wale_physical import WalePhysicalRecovery

log = logging.getLogger(__name__)


@dataclass
class WalSteps:
    """The WAL steps of the recovery `recovery` (its archive, pinned backup and cluster)."""

    recovery: WalePhysicalRecovery

    async def fetch_wal(self, ctx: StepContext) -> None:
        backup = await self.recovery.pinned_backup(ctx)
        archive = await self.recovery.archive()
        store = await self.recovery.store()
        target_text = ctx.status.facts.get("recoveryTarget", "")
        target = None if target_text in ("", "end of archive") else \
            datetime.fromisoformat(target_text)
        last = last_segment(archive, self.recovery._path)
        if last is None:  # pragma: no cover - resolve_archive checked
            raise BackupNotFound("no WAL")
        stop_segno = segno_of(backup.history.stop_lsn) if backup.history else \
            backup.name.first_segno
        holder = ProgressHolder()
        done = [0]

        def on_bytes(n: int) -> None:
            done[0] += n
            metrics.record_bytes("fetched", n)
            holder.set(done[0], None, f"WAL: {human_size(done[0])} downloaded and verified")

        async with pumping(ctx, holder):
            plan = await fetch_wal(
                store, archive, self.recovery._path, backup, target=target, last=last,
                stop_segno=stop_segno, work=self.recovery.wale_dir,
                sysid=int(ctx.status.facts["backupSysid"]), progress=on_bytes,
            )
            for obj in archive.histories.values():
                await download(store, obj, self.recovery.wale_dir)
        first, final = plan.segments[0], plan.segments[-1]
        await ctx.fact(
            walSegments=",".join(s.name for s in plan.segments),
            walRange=f"{first.name}..{final.name} ({len(plan.segments)} segments)",
            walEndLsn=format_lsn(final.start_lsn + WAL_SEGMENT_SIZE),
        )
        await ctx.update(lambda s: st.set_message(
            s, f"WAL {first.name}..{final.name} ({len(plan.segments)} segments) downloaded "
               "and verified"))

    async def plan_space(self, ctx: StepContext) -> None:
        phys = await self.recovery.phys(ctx)
        segments = ctx.status.facts["walSegments"].split(",")
        staged = len(segments) * WAL_SEGMENT_SIZE
        # PostgreSQL copies each segment it replays into pg_wal and recycles it soon after:
        # a few segments' room on top of the staged ones.
        needed = int(ctx.status.facts["expandedBytes"]) + staged + 4 * WAL_SEGMENT_SIZE
        plan = await phys.space_plan(self.recovery.view(ctx).primary, needed, staged)
        await ctx.fact(keepOldData="true" if plan.keep_old else "false",
                       freeBytesOnPrimary=str(plan.available), neededBytes=str(plan.needed),
                       spacePlan=plan.describe())


    def _wal_files(self, ctx: StepContext) -> list[tuple[str, int, Callable[[], AsyncIterator[
            bytes]]]]:
        archive = self.recovery._archive
        if archive is None:  # pragma: no cover - loaded by the caller
            raise FatalError("archive not loaded", reason="InternalError")
        files: list[tuple[str, int, Callable[[], AsyncIterator[bytes]]]] = []
        for name in ctx.status.facts["walSegments"].split(","):
            path = self.recovery.wale_dir / local_name(archive.segment_key(name))
            files.append((name, WAL_SEGMENT_SIZE, _file_source(path, name)))
        for tli, obj in sorted(archive.histories.items()):
            path = self.recovery.wale_dir / local_name(obj.key)
            plain = lzop.decompress_bytes(path.read_bytes(), obj.key)
            files.append((f"{tli:08X}.history", len(plain), _bytes_source(plain)))
        return files

    async def stage_wal(self, ctx: StepContext) -> None:
        await self.recovery.archive()
        phys = await self.recovery.phys(ctx)
        files = self._wal_files(ctx)
        total = sum(size for _, size, _ in files)
        holder = ProgressHolder(total=total)

        def on_bytes(done: int) -> None:
            holder.set(done, total, f"WAL staged on the primary: {human_size(done)} of "
                                    f"{human_size(total)}")

        async with pumping(ctx, holder):
            result = await phys.ensure_wal_staged(self.recovery.view(ctx).primary,
                                                  self.recovery.run_id(ctx), files,
                                                  on_bytes=on_bytes)
        metrics.record_bytes("uploaded", total)
        await ctx.fact(walStaged=phys.wal_dir(self.recovery.run_id(ctx)))
        await self.recovery.note(ctx, result)

    async def wal_staged(self, ctx: StepContext) -> bool:
        return "walStaged" in ctx.status.facts


def _file_source(path: Path, what: str) -> Callable[[], AsyncIterator[bytes]]:
    return lambda: blocks_async(path, what)


def _bytes_source(data: bytes) -> Callable[[], AsyncIterator[bytes]]:
    async def one() -> AsyncIterator[bytes]:
        yield data

    return one
