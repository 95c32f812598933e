"""Restoring of a logical recovery: the staged `pg_dumpall` script loaded into the primary —
serially with one psql as in the runbook, or in parallel sessions from the dump's index — with
the bulk-load and WAL-free settings around it.

Why this module exists: it is the one part of the logical plan that runs a long job on a VM;
kept apart from staging and proof so each reads on its own (issue 17). The step methods are
bound into the plan by `a9s_logical.build_a9s_logical_plan`.

Decisions recorded here:
- The mode (`parallel N` or `serial: <why>`) is pinned in status (`restoreMode`) before the
  job starts, so a resumed run re-attaches to the same kind of job.
- A restore that fails for good puts the bulk-load and WAL-free settings back (best effort)
  before the error is reported.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from pgrecovery.adapters.jobs import JobState
from pgrecovery.backups.progress import human_size
from pgrecovery.cluster import bulk_load, psql, wal_free
from pgrecovery.cluster.a9s import A9sOperations
from pgrecovery.cluster.dump_index import DumpIndex
from pgrecovery.cluster.nodes import ClusterView
from pgrecovery.cluster.parallel_restore import ParallelRestoreStatus
from pgrecovery.cluster.restore_job import restore_job
from pgrecovery.cluster.restore_script import default_concurrency
from pgrecovery.engine import status as st
from pgrecovery.engine.steps import StepContext
from pgrecovery.errors import FatalError, RestoreFailed
from pgrecovery.plans.a9s_cluster import A9sPgCluster

log = logging.getLogger(__name__)

# How often the detached psql job is polled; psql output is classified on the VM's log.
RESTORE_POLL_INTERVAL = 2.0
# Bound on the restore: a dump that restores slower than 1 MB/s for its whole size means
# something is wrong; the floor leaves small dumps an hour.
RESTORE_MIN_TIMEOUT = 3600.0
# restoreConnections 0 = one session per CPU of the primary, but no more than this: beyond ~8
# sessions a restore gains little and adds WAL and lock contention (the spec allows up to 32).
AUTO_RESTORE_CONNECTIONS_MAX = 8


def sessions_of(mode: str) -> int:
    """`parallel 4` → 4; `serial: …` → 1."""
    head, _, rest = mode.partition(" ")
    return int(rest) if head == "parallel" and rest.isdigit() else 1


IndexLoader = Callable[[int | None], tuple[DumpIndex | None, str]]


@dataclass
class DumpRestore:
    """The Restoring steps of a logical recovery, on the cluster of `cluster`; the dump's
    index comes from `load_index` (the staging side owns it)."""

    cluster: A9sPgCluster
    load_index: IndexLoader

    async def apply_bulk_load_settings(self, ctx: StepContext) -> None:
        """Fewer checkpoints while the dump loads (`cluster.bulk_load`): the outcome is the
        fact `bulkLoadSettings`."""
        ops = await self.cluster.ops(ctx)
        outcome = await bulk_load.apply(ops.shell, self.cluster.view(ctx).primary, ops.layout)
        await ctx.fact(bulkLoadSettings=outcome[:400])

    async def revert_bulk_load_settings(self, ctx: StepContext) -> None:
        ops = await self.cluster.ops(ctx)
        if await bulk_load.revert(ops.shell, self.cluster.view(ctx).primary, ops.layout):
            await ctx.fact(bulkLoadSettings="reverted")

    async def apply_wal_free_settings(self, ctx: StepContext) -> None:
        """`wal_level = minimal` on the primary for the WAL-free load (`cluster.wal_free`,
        a restart); the outcome is the fact `walFreeLoad`."""
        ops = await self.cluster.ops(ctx)
        outcome = await wal_free.apply(ops.shell, self.cluster.view(ctx).primary, ops.layout)
        await ctx.fact(walFreeLoad=f"on; settings {outcome}"[:400])

    async def revert_wal_free_settings(self, ctx: StepContext) -> None:
        """In every plan, whether or not this run used the WAL-free load: a marker left by an
        earlier run is put back here too (the re-clone needs wal_level replica)."""
        ops = await self.cluster.ops(ctx)
        if await wal_free.revert(ops.shell, self.cluster.view(ctx).primary, ops.layout):
            await ctx.fact(walFreeSettings="reverted")

    async def restore_dump(self, ctx: StepContext) -> None:
        """Load the staged dump into the primary: in parallel sessions when the dump's index
        is known and `spec.parallelism.restoreConnections` allows it, else one psql as in the
        runbook. The choice is pinned in status (`restoreMode`) before the job starts, so a
        resumed run re-attaches to the same kind of job.

        When the restore fails for good, the bulk-load settings are put back (best effort)
        before the error is reported: a failed recovery must not leave a primary with its
        checkpoint settings changed behind the person who repairs it.
        """
        try:
            await self._restore_dump(ctx)
        except FatalError:
            ops = await self.cluster.ops(ctx)
            try:
                if await bulk_load.revert(ops.shell, self.cluster.view(ctx).primary, ops.layout):
                    await ctx.fact(bulkLoadSettings="reverted after the failed restore")
            except Exception as exc:  # noqa: BLE001 - the restore's error is the one to report
                log.warning("could not put back the checkpoint settings after the failed "
                            "restore: %s", exc)
                await ctx.fact(bulkLoadSettings=f"NOT reverted after the failed restore: "
                                                f"{str(exc)[:200]}")
            try:
                if await wal_free.revert(ops.shell, self.cluster.view(ctx).primary, ops.layout):
                    await ctx.fact(walFreeSettings="reverted after the failed restore")
            except Exception as exc:  # noqa: BLE001 - the restore's error is the one to report
                log.warning("could not put back wal_level after the failed restore: %s", exc)
                await ctx.fact(walFreeSettings=f"NOT reverted after the failed restore (the "
                                               f"next run does it): {str(exc)[:200]}")
            raise

    async def _restore_dump(self, ctx: StepContext) -> None:
        ops = await self.cluster.ops(ctx)
        view = self.cluster.view(ctx)
        backup_id = ctx.status.backup.id
        if backup_id is None:
            raise FatalError("no backup pinned in status", reason="InternalError")
        run_id = self.cluster.run_id(ctx)
        if not self.cluster.spec.restore.wal_free_load and "walFreeLoad" not in ctx.status.facts:
            await ctx.fact(walFreeLoad="off (spec.restore.walFreeLoad is false)")
        mode = ctx.status.facts.get("restoreMode")
        if mode is None:
            mode = await self.choose_restore_mode(ctx, ops, view)
            await ctx.fact(restoreMode=mode)
        # Every psql of the restore starts in `postgres`; a restore cut between the dump's
        # DROP DATABASE postgres and its CREATE left none (`psql.MAINTENANCE_DATABASE`). Also
        # on a re-attach: were the running restore between those two statements, its CREATE
        # meets "already exists" (expected) and fills the empty database made here.
        if await psql.ensure_maintenance_database(ops.shell, view.primary, ops.layout):
            await ctx.fact(maintenanceDatabase=(
                "re-created postgres before the restore: the primary had none (an interrupted "
                "restore of a --clean dump drops and creates it)"))
        plain = ctx.status.backup.plain_size_bytes or 0
        deadline = time.monotonic() + max(RESTORE_MIN_TIMEOUT, plain / 1e6)
        sessions = sessions_of(mode)
        index = None
        if sessions > 1:
            index, why = self.load_index(ctx.status.backup.plain_size_bytes)
            if index is None:
                raise RestoreFailed(f"the parallel restore was chosen but {why}")
        job = restore_job(
            ops, view, backup_id, run_id, sessions=sessions, index=index,
            wal_free=self.cluster.spec.restore.wal_free_load,
            fresh_databases=json.loads(ctx.status.facts.get("databasesToReplace", "[]")))
        found = await ops.jobs.poll_job(view.primary.endpoint, job.job_id, tail_bytes=0)
        if found.state is JobState.ABSENT:
            # The dump drops databases, and DROP DATABASE fails ("being accessed by other
            # users") while any session is in one. Sessions were ended in Staging, but local
            # ones may have come back since (pg_hba blocks only remote clients; the WAL-free
            # restart lets the server's own start-up clients in): end them again right before
            # the restore — never once it runs (its own psql sessions are clients too).
            ended = await ops.terminate_client_sessions(view.primary)
            if ended:
                await ctx.fact(sessionsEndedBeforeRestore=str(ended))
        await job.start()
        # Progress from the start (or the re-attach): a restore shorter than one long poll
        # would otherwise show none at all.
        await ctx.progress(0, plain or None, f"restored 0 B of {human_size(plain)} (job running)")
        while True:
            ctx.raise_if_cancelled()
            # Long polls: each returns as soon as the restore ends, or after the interval with
            # its progress; so no sleep between them (unless one came back early).
            asked = time.monotonic()
            polled = await job.poll(wait=RESTORE_POLL_INTERVAL)
            if polled.done:
                break
            if polled.bytes_read is not None:
                tasks = (
                    f" ({polled.tasks_done}/{polled.tasks_total} tasks, {sessions} sessions)"
                    if isinstance(polled, ParallelRestoreStatus)
                    else ""
                )
                await ctx.progress(
                    polled.bytes_read,
                    polled.bytes_total,
                    f"restored {human_size(polled.bytes_read)} of "
                    f"{human_size(polled.bytes_total or 0)}{tasks}",
                )
            if time.monotonic() > deadline:
                raise FatalError(
                    "the restore did not finish in time; its job is still running on "
                    f"{view.primary.name}",
                    reason="RestoreTimeout",
                )
            await asyncio.sleep(max(0.0, RESTORE_POLL_INTERVAL - (time.monotonic() - asked)))
        report = polled.report
        if report is None or not report.ok:
            summary = report.summary() if report is not None else "no report"
            raise RestoreFailed(f"psql reported errors that are not expected: {summary}")
        if isinstance(polled, ParallelRestoreStatus) and polled.fallbacks:
            await ctx.fact(
                restoredSerially="; ".join(f"{db}: {why}" for db, why in polled.fallbacks.items())[
                    :900
                ]
            )
        await ctx.fact(restoreReport=report.summary()[:900])
        await ctx.update(lambda s: st.set_message(s, f"restore done; {report.summary()[:400]}"))

    async def choose_restore_mode(
        self, ctx: StepContext, ops: A9sOperations, view: ClusterView
    ) -> str:
        """`parallel N` or `serial: <why>` (recorded as the fact `restoreMode`)."""
        wanted = self.cluster.spec.parallelism.restore_connections
        if wanted == 1:
            return "serial: spec.parallelism.restoreConnections is 1"
        index, why = self.load_index(ctx.status.backup.plain_size_bytes)
        if index is None:
            return f"serial: {why}"
        if index.fallback:
            return f"serial: the dump could not be split ({index.fallback[:300]})"
        if index.databases and all(db.fallback for db in index.databases):
            return "serial: no database of the dump could be split (" + "; ".join(
                f"{k}: {v}" for k, v in index.fallbacks.items()
            )[:300] + ")"
        if wanted == 0:
            nproc = await ops.shell.run_root(view.primary.endpoint, ["nproc"], timeout=30)
            wanted = min(AUTO_RESTORE_CONNECTIONS_MAX, default_concurrency(nproc.stdout))
        return f"parallel {wanted}"

    async def restore_done(self, ctx: StepContext) -> bool:
        return "restoreReport" in ctx.status.facts
