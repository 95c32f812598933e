"""The WAL-E physical (point-in-time) recovery plan onto an a9s-pg cluster.

Why this module exists: it binds the engine's phases to the WAL-E reader (`backups.wale`),
the physical restore (`cluster.physical`) and — for everything the logical path already does
(probing, Staging, re-registering, re-cloning, verifying) — the logical plan's recovery object
and `A9sOperations`, so both paths stop, block, rejoin and verify a cluster the same way. The
WAL steps are `wale_wal`, the physical restore `wale_restore`.

Phases:
- Fetching (read-only): list the archive, compute and SHOW the recovery window (fact
  `recoveryWindow`, status message), choose the base backup (`baseBackup`, `recoveryTarget`),
  download and verify the base backup (every lzop checksum, pg_control's system identifier
  against `sysids/sysid`) and the WAL the target needs (continuity, each segment's system
  identifier, a transaction past the target), probe the cluster, plan the disk space.
  Anything wrong stops here: TargetOutsideWindow (message carries the window),
  BackupIncomplete (names the missing segment), BackupCorrupt/SystemIdMismatch.
- Decrypting (not destructive): stage the decompressed WAL in `<state dir>/wal/<run>` on the
  primary (the "decrypting" of this path is lzop; walE archives carry no encryption here).
- Staging: the logical path's steps (standbys stopped, repmgr stopped, connections blocked…).
- Restoring: PostgreSQL stopped on the primary, data directory set aside or wiped, base
  backup unpacked, recovery configured, replay watched until promotion, point reached read
  back (`reachedTime`, `reachedLsn`), recovery settings removed.
- Rejoined: as the logical plan (repmgr schema, registration, re-clones, verify), then the
  WAL staging directory, saved config and old data directory removed.

Archive prefix: `spec.source.s3.prefix` when set, else `backups/<backupGuid>/wal/`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from pgrecovery import metrics
from pgrecovery.backups.progress import human_size
from pgrecovery.backups.wale.archive import Archive, BaseBackup, list_archive, load_details
from pgrecovery.backups.wale.fetch import (
    SystemIdMismatch,
    download,
    local_name,
    verify_base_backup,
    window_end,
)
from pgrecovery.backups.wale.layout import (
    default_prefix,
    normalise_prefix,
)
from pgrecovery.backups.wale.planning import (
    RecoveryWindow,
    TimelineEntry,
    check_backup_on_path,
    choose_backup,
    last_segment,
    recovery_window,
    timeline_path,
)
from pgrecovery.cluster.nodes import A9sLayout, Node, validate_run_id
from pgrecovery.cluster.physical import PhysicalOperations
from pgrecovery.engine import status as st
from pgrecovery.engine.phases import Phase
from pgrecovery.engine.plan import Plan, PlanInputs
from pgrecovery.engine.status import BackupInfo, RecoveryStatus
from pgrecovery.engine.steps import FunctionStep, Step, StepContext, self_checking
from pgrecovery.errors import BackupCorrupt, BackupNotFound, FatalError
from pgrecovery.plans.a9s_cluster import (
    A9sPgCluster,
    rejoined_steps,
    staging_steps,
    tools_checked,
)
from pgrecovery.plans.a9s_leftovers import RecoveryFiles
from pgrecovery.plans.base import ProgressHolder, fact_recorded, pumping, target_nodes
from pgrecovery.plans.state_words import STATE_WORDS
from pgrecovery.plans.wale_restore import PhysicalRestore
from pgrecovery.plans.wale_wal import WalSteps

log = logging.getLogger(__name__)

# tar -x on a BOSH persistent disk runs at >= 20 MB/s; the floor covers small backups.
EXTRACT_MIN_TIMEOUT = 1800.0
EXTRACT_SECONDS_PER_BYTE = 1 / 20e6


@dataclass(kw_only=True)
class WalePhysicalRecovery(A9sPgCluster):
    """One phase run of a point-in-time recovery: the a9s-pg cluster side (`A9sPgCluster`) and
    the WAL-E archive, its base backup and WAL, the physical restore."""

    _archive: Archive | None = None
    _path: list[TimelineEntry] = field(default_factory=list)
    _phys: PhysicalOperations | None = None

    # ------------------------------------------------------------------ archive

    @property
    def prefix(self) -> str:
        s3 = self.spec.source.s3
        given = s3.prefix if s3 is not None else ""
        return normalise_prefix(given) if given else default_prefix(self.spec.source.backup_guid)

    def owned_work_paths(self) -> list[Path]:
        """The base backup partitions and WAL segments fetched into the work directory."""
        return [self.work_dir / "wale"]

    @property
    def wale_dir(self) -> Path:
        d = self.work_dir / "wale"
        d.mkdir(parents=True, exist_ok=True)
        return d

    async def archive(self) -> Archive:
        if self._archive is None:
            archive = await list_archive(await self.store(), self.prefix)
            await load_details(await self.store(), archive)
            self._path = timeline_path(archive)
            self._archive = archive
        return self._archive

    async def pinned_backup(self, ctx: StepContext) -> BaseBackup:
        archive = await self.archive()
        name = ctx.status.backup.id
        backup = archive.backups.get(name or "")
        if backup is None or backup.sentinel is None:
            raise BackupNotFound(f"base backup {name} pinned in status is no longer complete "
                                 f"in {archive.where('basebackups_005/')}")
        return backup

    def target_time(self) -> datetime | None:
        pit = self.spec.point_in_time
        return pit.target_time if pit is not None else None

    def run_id_of(self, status: RecoveryStatus) -> str:
        name = status.backup.id
        if not name:
            raise FatalError("no base backup pinned in status", reason="InternalError")
        uid = "".join(c for c in self.inputs.uid.lower() if c.isalnum())[:8]
        return validate_run_id(f"pitr-{uid}-{name.removeprefix('base_')[:24].lower()}")

    async def phys(self, ctx: StepContext) -> PhysicalOperations:
        if self._phys is None:
            await self.ops(ctx)
            pool = self._pool
            if pool is None:  # pragma: no cover - ops() opened it
                raise FatalError("SSH pool missing", reason="InternalError")
            extract_timeout = EXTRACT_MIN_TIMEOUT + int(
                ctx.status.facts.get("expandedBytes", "0")) * EXTRACT_SECONDS_PER_BYTE

            async def pipe(node: Node, argv: Sequence[str], chunks: AsyncIterable[bytes],
                           on_bytes: Callable[[int], None]) -> object:
                return await pool.pipe_root(node.endpoint, argv, chunks,
                                           timeout=extract_timeout, progress=on_bytes)

            self._phys = PhysicalOperations(pool, pipe, layout=self.layout,
                                            progress=self._on_cluster_progress)
        return self._phys

    # ------------------------------------------------------------------ Fetching

    async def resolve_archive(self, ctx: StepContext) -> None:
        archive = await self.archive()
        last = last_segment(archive, self._path)
        if last is None:
            raise BackupNotFound(f"no WAL on the newest timeline in {archive.where('wal_005/')}")
        end = await window_end(await self.store(), archive, self._path, last, self.wale_dir,
                               archive.sysid)
        window = recovery_window(archive, end, last)
        await ctx.fact(
            archivePrefix=archive.where(""),
            recoveryWindow=window.describe(),
            windowStart=window.start.isoformat() if window.start else "",
            windowEnd=window.end.isoformat() if window.end else "",
            archiveSysid=str(archive.sysid) if archive.sysid is not None else "",
            windowLastSegment=window.last_segment,
        )
        await ctx.update(lambda s: st.set_message(s, f"recovery window {window.describe()}"))

    def _window(self, ctx: StepContext, archive: Archive) -> RecoveryWindow:
        facts = ctx.status.facts
        backups = archive.complete_backups
        return RecoveryWindow(
            start=datetime.fromisoformat(facts["windowStart"]) if facts.get("windowStart")
            else None,
            end=datetime.fromisoformat(facts["windowEnd"]) if facts.get("windowEnd") else None,
            earliest_backup=backups[0].name.name,
            latest_backup=backups[-1].name.name,
            last_segment=facts.get("windowLastSegment", ""),
        )

    async def choose_backup(self, ctx: StepContext) -> None:
        archive = await self.archive()
        window = self._window(ctx, archive)
        pit = self.spec.point_in_time
        choice = choose_backup(archive, window, self.target_time(),
                               pit.best_effort if pit else False)
        backup = choice.backup
        check_backup_on_path(backup, self._path, archive)
        info = BackupInfo(
            id=backup.name.name,
            taken_at=backup.history.stop_time if backup.history else None,
            parts=len(backup.parts),
            size_bytes=backup.compressed_size,
        )
        await ctx.update(lambda s: st.set_backup(s, info))
        requested = self.target_time()
        await ctx.fact(
            baseBackup=backup.name.name,
            targetTime=requested.isoformat() if requested else "",
            recoveryTarget=choice.target_time.isoformat() if choice.target_time
            else "end of archive",
            choice=choice.note,
        )
        await ctx.update(lambda s: st.set_message(
            s, f"base backup {backup.name.name}; {choice.note}; window {window.describe()}"))

    def part_path(self, backup: BaseBackup, index: int) -> Path:
        return self.wale_dir / local_name(backup.parts[index].key)

    async def parts_downloaded(self, ctx: StepContext) -> bool:
        if ctx.status.backup.id is None:
            return False
        backup = await self.pinned_backup(ctx)
        return all(self.part_path(backup, i).exists() and
                   self.part_path(backup, i).stat().st_size == p.size
                   for i, p in enumerate(backup.parts))

    async def download_base_backup(self, ctx: StepContext) -> None:
        backup = await self.pinned_backup(ctx)
        store = await self.store()
        holder = ProgressHolder(total=backup.compressed_size)
        done = [0]

        def on_bytes(n: int) -> None:
            done[0] += n
            metrics.record_bytes("fetched", n)
            holder.set(done[0], backup.compressed_size,
                       f"base backup {backup.name.name}: {human_size(done[0])} of "
                       f"{human_size(backup.compressed_size)} downloaded")

        async with pumping(ctx, holder):
            for part in backup.parts:
                await download(store, part, self.wale_dir, on_bytes)

    async def verify_base_backup(self, ctx: StepContext) -> None:
        backup = await self.pinned_backup(ctx)
        archive = await self.archive()
        parts = [(self.part_path(backup, i), p.key) for i, p in enumerate(backup.parts)]
        await ctx.progress(0, None, f"verifying {len(parts)} tar partition(s)")
        sysid, expanded = await asyncio.to_thread(verify_base_backup, parts)
        if sysid is None:
            raise BackupCorrupt(f"base backup {backup.name.name} holds no global/pg_control; "
                                "it is not a PostgreSQL base backup")
        if archive.sysid is not None and sysid != archive.sysid:
            raise SystemIdMismatch(
                f"base backup {backup.name.name} is of database system {sysid}, but "
                f"{archive.where('sysids/sysid')} says {archive.sysid}: the prefix mixes two "
                "clusters (e.g. the new instance's own backup after `aws s3 sync`); refusing "
                "to restore"
            )
        await ctx.fact(backupSysid=str(sysid), expandedBytes=str(expanded))

    async def sysid_checked(self, ctx: StepContext) -> bool:
        return "backupSysid" in ctx.status.facts

async def build_wale_physical_plan(inputs: PlanInputs) -> Plan:
    spec = inputs.spec
    r = WalePhysicalRecovery(
        inputs=inputs,
        layout=A9sLayout(postgres_major=spec.target.postgres_major_version),
        nodes=target_nodes(spec),
    )

    wal, restore = WalSteps(recovery=r), PhysicalRestore(recovery=r)

    async def backup_chosen(ctx: StepContext) -> bool:
        return ctx.status.backup.id is not None and "recoveryTarget" in ctx.status.facts

    steps: dict[Phase, list[Step]] = {
        Phase.FETCHING: [
            FunctionStep("resolve-archive", fact_recorded("recoveryWindow"), r.resolve_archive,
                         verify_after=False),
            FunctionStep("choose-base-backup", backup_chosen, r.choose_backup),
            FunctionStep("download-base-backup", r.parts_downloaded, r.download_base_backup),
            FunctionStep("verify-base-backup", r.sysid_checked, r.verify_base_backup),
            FunctionStep("fetch-wal", fact_recorded("walSegments"), wal.fetch_wal),
            self_checking("probe-cluster", r.probe_cluster),
            FunctionStep("check-cluster-tools", tools_checked, r.check_cluster_tools,
                         verify_after=False),
            self_checking("plan-disk-space", wal.plan_space),
        ],
        Phase.DECRYPTING: [
            FunctionStep("ensure-wal-staged", wal.wal_staged, wal.stage_wal),
        ],
        Phase.STAGING: staging_steps(r, drop_inactive_slots=False),
        Phase.RESTORING: [
            restore.phys_step("ensure-postgres-stopped-on-primary",
                        lambda p, n, run: p.ensure_postgres_stopped(n), "primaryStopped"),
            self_checking("ensure-data-dir-replaced", restore.replace_data_dir),
            FunctionStep("ensure-base-backup-extracted", restore.extracted,
                         restore.extract_base_backup),
            FunctionStep("ensure-recovery-configured", restore.recovery_configured,
                         restore.configure_recovery),
            restore.phys_step("ensure-recovery-started",
                        lambda p, n, run: p.ensure_recovery_started(n)),
            FunctionStep("wait-for-promotion", restore.promoted, restore.wait_promotion),
            restore.phys_step("ensure-recovery-settings-removed",
                        lambda p, n, run: p.ensure_recovery_settings_removed(n)),
        ],
    }
    steps[Phase.REJOINED] = rejoined_steps(r, before_unblock=[
        self_checking("ensure-leftovers-removed", restore.leftovers_removed),
    ])
    return Plan(steps=steps, closers=[r.close], leftovers=RecoveryFiles(r), state_words=STATE_WORDS,
                observe_nodes=r.observed_nodes)
