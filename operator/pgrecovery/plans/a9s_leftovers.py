"""What an a9s-pg recovery leaves on the VMs and the operator's work volume, seen from the plan:
listed after a failure, removed by the last Rejoined step, on deletion and by `pgrecovery
cleanup` (`Plan.leftovers`).

Why this module exists: the list of files is `cluster.leftovers`; this adds what only the plan
knows — this run's jobs to cancel first, the settings a restore changed to put back, the work
files it owns — and the kill-safe cleanup step, for the logical and the WAL-E plan alike.

Decisions recorded here:
- The cleanup step records `cleanup: started` durably before it removes the journal and job
  records the earlier Rejoined steps resume from; from then on those steps check as done
  (`with_recovery_files_removed`), and a restarted operator comes straight back to it.
- On deletion the blocked pg_hba stays (a half-restored primary must not take application
  writes), with its original beside it for the next run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pgrecovery.cluster import bulk_load, wal_free
from pgrecovery.cluster.leftovers import list_leftovers, remove_leftovers
from pgrecovery.engine import status as st
from pgrecovery.engine.status import RecoveryStatus
from pgrecovery.engine.steps import FunctionStep, Step, StepContext
from pgrecovery.errors import RecoveryError

if TYPE_CHECKING:
    from pgrecovery.plans.a9s_cluster import A9sPgCluster


@dataclass
class RecoveryFiles:
    """`Plan.leftovers` and the cleanup step of a plan on the cluster of `cluster`."""

    cluster: A9sPgCluster

    async def remove_recovery_files(self, ctx: StepContext) -> None:
        """The last step: everything this recovery put on any VM (job directories and logs,
        journal, parallel-restore work, clone markers, the staged dump) and on the operator's
        work volume (downloaded parts, dump index) is removed (`cluster.leftovers`).

        Kill-safe: the earlier Rejoined steps resume from the journal and the job records this
        step deletes, so it first records `cleanup: started` and waits until that is durable;
        from then on those steps check as done (`_unless_cleaning`) and a restarted operator
        comes straight back here.
        """
        if not _cleaning(ctx):
            await ctx.fact(cleanup="started")
            await ctx.checkpoint()
        ops = await self.cluster.ops(ctx)
        removed = await remove_leftovers(ops.shell, self.cluster.nodes, ops.layout,
                                         self.cluster.staged_dump_of(ctx.status))
        await ctx.breakpoints.reach("inside-ensure-recovery-files-removed")
        local = await asyncio.to_thread(self._remove_work_files)
        what = [str(r) for r in removed] + local
        await ctx.fact(cleanup=f"done; removed {len(what)}: {'; '.join(what)}"[:900])
        nodes = len(self.cluster.nodes)
        await ctx.update(lambda s: st.set_message(
            s, f"recovery files removed from {nodes} node(s) and the work volume"))

    async def find(self, status: RecoveryStatus) -> list[str]:
        """What this recovery has on the VMs and the work volume now (read-only)."""
        ops = await self.cluster.connect()
        found = await list_leftovers(ops.shell, self.cluster.nodes, ops.layout,
                                     self.cluster.staged_dump_of(status))
        return [str(f) for f in found] + await asyncio.to_thread(self._work_files)

    async def remove(self, status: RecoveryStatus) -> list[str]:
        """Deletion / `pgrecovery cleanup`: cancel this run's jobs (a restore or a clone still
        running), then remove everything (`cluster.leftovers`, the work files)."""
        ops = await self.cluster.connect()
        if status.backup.id is not None:
            await self.cluster.cancel_jobs(ops, status)
        notes: list[str] = []
        primary = next((n for n in self.cluster.nodes if n.name == status.primary), None)
        if primary is not None:
            # The checkpoint settings of a restore are ours to give back; the blocked pg_hba
            # stays (a half-restored primary must not take application writes) with its
            # original beside it, for the next run.
            try:
                if await bulk_load.revert(ops.shell, primary, ops.layout):
                    notes.append(f"{primary.name}: checkpoint settings reverted")
            except RecoveryError as exc:
                notes.append(f"{primary.name}: checkpoint settings NOT reverted, marker kept "
                             f"for the next run ({exc})")
            try:
                if await wal_free.revert(ops.shell, primary, ops.layout):
                    notes.append(f"{primary.name}: wal_level and WAL senders reverted")
            except RecoveryError as exc:
                notes.append(f"{primary.name}: wal_level NOT reverted, marker kept for the "
                             f"next run ({exc})")
        removed = await remove_leftovers(ops.shell, self.cluster.nodes, ops.layout,
                                         self.cluster.staged_dump_of(status))
        return ([str(r) for r in removed] + await asyncio.to_thread(self._remove_work_files)
                + notes)

    def _work_files(self) -> list[str]:
        return [f"operator:{path} ({_size_of(path)} B)"
                for path in self.cluster.owned_work_paths() if path.exists()]

    def _remove_work_files(self) -> list[str]:
        gone = self._work_files()
        for path in self.cluster.owned_work_paths():
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        with contextlib.suppress(OSError):
            self.cluster.work_dir.rmdir()  # only when empty
        return gone


def with_recovery_files_removed(files: RecoveryFiles, rejoined: list[Step]) -> list[Step]:
    """The Rejoined steps, then the cleanup; once it has begun they check as done (their
    resume records are what it removes)."""
    return [
        *(_unless_cleaning(step) for step in rejoined),
        FunctionStep("ensure-recovery-files-removed", _cleaned, files.remove_recovery_files,
                     verify_after=False),
    ]


def _size_of(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size



def _cleaning(ctx: StepContext) -> bool:
    return ctx.status.facts.get("cleanup", "").startswith(("started", "done"))


async def _cleaned(ctx: StepContext) -> bool:
    return ctx.status.facts.get("cleanup", "").startswith("done")


def _unless_cleaning(step: Step) -> Step:
    """The step checks as done once the cleanup has begun (its resume records are gone)."""
    if not isinstance(step, FunctionStep):
        return step
    original = step.check_fn

    async def check(ctx: StepContext) -> bool:
        return _cleaning(ctx) or await original(ctx)

    return dataclasses.replace(step, check_fn=check)
