"""The WAL-E physical (point-in-time) recovery plan onto an a9s-pg cluster.

Why this module exists: it binds the engine's phases to the WAL-E reader (`backups.wale`),
the physical restore (`cluster.physical`) and — for everything the logical path already does
(probing, Staging, re-registering, re-cloning, verifying) — the logical plan's recovery object
and `A9sOperations`, so both paths stop, block, rejoin and verify a cluster the same way.

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
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from pgrecovery import metrics
from pgrecovery.adapters.ssh_pipe import pipe_to_root
from pgrecovery.backups.wale import lzop
from pgrecovery.backups.wale.archive import Archive, BaseBackup, list_archive, load_details
from pgrecovery.backups.wale.fetch import (
    SystemIdMismatch,
    download,
    fetch_wal,
    local_name,
    verify_base_backup,
    window_end,
)
from pgrecovery.backups.wale.layout import (
    WAL_SEGMENT_SIZE,
    Segment,
    default_prefix,
    format_lsn,
    normalise_prefix,
    segno_of,
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
from pgrecovery.cluster.a9s import A9sOperations, StepResult
from pgrecovery.cluster.nodes import A9sLayout, ClusterView, Node, validate_run_id
from pgrecovery.cluster.physical import PhysicalOperations, ReplayState
from pgrecovery.engine import status as st
from pgrecovery.engine.phases import Phase
from pgrecovery.engine.plan import Plan, PlanInputs
from pgrecovery.engine.plans.a9s_logical import (
    STATE_WORDS,
    A9sLogicalRecovery,
    _human,
    _never,
    _ProgressHolder,
    _pumping,
    _tools_checked,
    with_recovery_files_removed,
)
from pgrecovery.engine.status import BackupInfo, NodeState, RecoveryStatus
from pgrecovery.engine.steps import FunctionStep, Step, StepContext
from pgrecovery.errors import BackupCorrupt, BackupNotFound, FatalError

log = logging.getLogger(__name__)

# tar -x on a BOSH persistent disk runs at >= 20 MB/s; the floor covers small backups.
EXTRACT_MIN_TIMEOUT = 1800.0
EXTRACT_SECONDS_PER_BYTE = 1 / 20e6


async def _blocks_async(path: Path, what: str) -> AsyncIterator[bytes]:
    """Decoded lzop blocks of a local file, decoded in a worker thread."""
    it = lzop.decode_file(path, what)
    while True:
        block = await asyncio.to_thread(next, it, None)
        if block is None:
            return
        yield block


@dataclass
class WalePhysicalRecovery(A9sLogicalRecovery):
    """Reuses the logical recovery's clients, cluster view and Staging/Rejoined helpers."""

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

    def staged_dump_of(self, status: RecoveryStatus) -> str | None:
        return None  # base backup and WAL are staged, never a dump

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
                return await pipe_to_root(pool, node.endpoint, argv, chunks,
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

    def _part_path(self, backup: BaseBackup, index: int) -> Path:
        return self.wale_dir / local_name(backup.parts[index].key)

    async def parts_downloaded(self, ctx: StepContext) -> bool:
        if ctx.status.backup.id is None:
            return False
        backup = await self.pinned_backup(ctx)
        return all(self._part_path(backup, i).exists() and
                   self._part_path(backup, i).stat().st_size == p.size
                   for i, p in enumerate(backup.parts))

    async def download_base_backup(self, ctx: StepContext) -> None:
        backup = await self.pinned_backup(ctx)
        store = await self.store()
        holder = _ProgressHolder(total=backup.compressed_size)
        done = [0]

        def on_bytes(n: int) -> None:
            done[0] += n
            metrics.record_bytes("fetched", n)
            holder.set(done[0], backup.compressed_size,
                       f"base backup {backup.name.name}: {_human(done[0])} of "
                       f"{_human(backup.compressed_size)} downloaded")

        async with _pumping(ctx, holder):
            for part in backup.parts:
                await download(store, part, self.wale_dir, on_bytes)

    async def verify_base_backup(self, ctx: StepContext) -> None:
        backup = await self.pinned_backup(ctx)
        archive = await self.archive()
        parts = [(self._part_path(backup, i), p.key) for i, p in enumerate(backup.parts)]
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

    async def fetch_wal(self, ctx: StepContext) -> None:
        backup = await self.pinned_backup(ctx)
        archive = await self.archive()
        store = await self.store()
        target_text = ctx.status.facts.get("recoveryTarget", "")
        target = None if target_text in ("", "end of archive") else \
            datetime.fromisoformat(target_text)
        last = last_segment(archive, self._path)
        if last is None:  # pragma: no cover - resolve_archive checked
            raise BackupNotFound("no WAL")
        stop_segno = segno_of(backup.history.stop_lsn) if backup.history else \
            backup.name.first_segno
        holder = _ProgressHolder()
        done = [0]

        def on_bytes(n: int) -> None:
            done[0] += n
            metrics.record_bytes("fetched", n)
            holder.set(done[0], None, f"WAL: {_human(done[0])} downloaded and verified")

        async with _pumping(ctx, holder):
            plan = await fetch_wal(
                store, archive, self._path, backup, target=target, last=last,
                stop_segno=stop_segno, work=self.wale_dir,
                sysid=int(ctx.status.facts["backupSysid"]), progress=on_bytes,
            )
            for obj in archive.histories.values():
                await download(store, obj, self.wale_dir)
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
        phys = await self.phys(ctx)
        segments = ctx.status.facts["walSegments"].split(",")
        staged = len(segments) * WAL_SEGMENT_SIZE
        # PostgreSQL copies each segment it replays into pg_wal and recycles it soon after:
        # a few segments' room on top of the staged ones.
        needed = int(ctx.status.facts["expandedBytes"]) + staged + 4 * WAL_SEGMENT_SIZE
        plan = await phys.space_plan(self.view(ctx).primary, needed, staged)
        await ctx.fact(keepOldData="true" if plan.keep_old else "false",
                       freeBytesOnPrimary=str(plan.available), neededBytes=str(plan.needed),
                       spacePlan=plan.describe())

    # ------------------------------------------------------------------ Decrypting

    def _wal_files(self, ctx: StepContext) -> list[tuple[str, int, Callable[[], AsyncIterator[
            bytes]]]]:
        archive = self._archive
        if archive is None:  # pragma: no cover - loaded by the caller
            raise FatalError("archive not loaded", reason="InternalError")
        files: list[tuple[str, int, Callable[[], AsyncIterator[bytes]]]] = []
        for name in ctx.status.facts["walSegments"].split(","):
            path = self.wale_dir / local_name(archive.segment_key(name))
            files.append((name, WAL_SEGMENT_SIZE, _file_source(path, name)))
        for tli, obj in sorted(archive.histories.items()):
            path = self.wale_dir / local_name(obj.key)
            plain = lzop.decompress_bytes(path.read_bytes(), obj.key)
            files.append((f"{tli:08X}.history", len(plain), _bytes_source(plain)))
        return files

    async def stage_wal(self, ctx: StepContext) -> None:
        await self.archive()
        phys = await self.phys(ctx)
        files = self._wal_files(ctx)
        total = sum(size for _, size, _ in files)
        holder = _ProgressHolder(total=total)

        def on_bytes(done: int) -> None:
            holder.set(done, total, f"WAL staged on the primary: {_human(done)} of "
                                    f"{_human(total)}")

        async with _pumping(ctx, holder):
            result = await phys.ensure_wal_staged(self.view(ctx).primary, self.run_id(ctx),
                                                  files, on_bytes=on_bytes)
        metrics.record_bytes("uploaded", total)
        await ctx.fact(walStaged=phys.wal_dir(self.run_id(ctx)))
        await self.note(ctx, result)

    async def wal_staged(self, ctx: StepContext) -> bool:
        return "walStaged" in ctx.status.facts

    # ------------------------------------------------------------------ Restoring

    def phys_step(self, name: str,
                  op: Callable[[PhysicalOperations, Node, str], Awaitable[StepResult]],
                  done_fact: str | None = None) -> Step:
        async def check(ctx: StepContext) -> bool:
            return done_fact is not None and done_fact in ctx.status.facts

        async def apply(ctx: StepContext) -> None:
            phys = await self.phys(ctx)
            result = await op(phys, self.view(ctx).primary, self.run_id(ctx))
            if done_fact is not None:
                await ctx.fact(**{done_fact: result.message[:200]})
            await self.note(ctx, result)

        return FunctionStep(name, check, apply, verify_after=False)

    async def replace_data_dir(self, ctx: StepContext) -> None:
        phys = await self.phys(ctx)
        keep = ctx.status.facts.get("keepOldData") == "true"
        run_id = self.run_id(ctx)
        if keep:
            # Written first: if anything later fails, the status says where the old data is.
            await ctx.fact(oldDataDir=phys.old_data_dir(run_id))
        await self.note(ctx, await phys.ensure_data_dir_replaced(self.view(ctx).primary, run_id,
                                                                 keep_old=keep))

    async def extract_base_backup(self, ctx: StepContext) -> None:
        backup = await self.pinned_backup(ctx)
        phys = await self.phys(ctx)
        primary = self.view(ctx).primary
        run_id = self.run_id(ctx)
        total = int(ctx.status.facts.get("expandedBytes", "0")) or None
        holder = _ProgressHolder(total=total)
        base = [0]

        async with _pumping(ctx, holder):
            for index, part in enumerate(backup.parts):
                def on_bytes(n: int, index: int = index) -> None:
                    holder.set(base[0] + n, total,
                               f"extracting partition {index + 1}/{len(backup.parts)}: "
                               f"{_human(base[0] + n)} of {_human(total or 0)} into "
                               f"{self.layout.data_dir}")

                counter = _Counted(_blocks_async(self._part_path(backup, index), part.key))
                await phys.ensure_partition_extracted(primary, run_id, index, counter.chunks(),
                                                      on_bytes)
                base[0] += counter.size
        await ctx.fact(baseBackupExtracted=str(base[0]))

    async def extracted(self, ctx: StepContext) -> bool:
        return "baseBackupExtracted" in ctx.status.facts

    async def configure_recovery(self, ctx: StepContext) -> None:
        phys = await self.phys(ctx)
        target_text = ctx.status.facts.get("recoveryTarget", "")
        target = None if target_text in ("", "end of archive") else \
            datetime.fromisoformat(target_text)
        result = await phys.ensure_recovery_configured(self.view(ctx).primary,
                                                       self.run_id(ctx), target)
        await ctx.fact(recoveryConfigured="true")
        await self.note(ctx, result)

    async def recovery_configured(self, ctx: StepContext) -> bool:
        # Never write recovery.signal again once replay started: a promoted primary would
        # go back into recovery.
        return "recoveryConfigured" in ctx.status.facts

    async def wait_promotion(self, ctx: StepContext) -> None:
        phys = await self.phys(ctx)
        primary = self.view(ctx).primary
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
        phys = await self.phys(ctx)
        await self.note(ctx, await phys.ensure_leftovers_removed(self.view(ctx).primary,
                                                                 self.run_id(ctx)))


class _Counted:
    """Counts the bytes an async stream has yielded (a skipped partition yields none)."""

    def __init__(self, source: AsyncIterator[bytes]) -> None:
        self.source = source
        self.size = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self.source:
            self.size += len(chunk)
            yield chunk


def _file_source(path: Path, what: str) -> Callable[[], AsyncIterator[bytes]]:
    return lambda: _blocks_async(path, what)


def _bytes_source(data: bytes) -> Callable[[], AsyncIterator[bytes]]:
    async def one() -> AsyncIterator[bytes]:
        yield data

    return one


async def build_wale_physical_plan(inputs: PlanInputs) -> Plan:
    spec = inputs.spec
    node_specs, ssh = spec.target.require_nodes()
    nodes = tuple(Node(name=n.name, address=n.address, port=ssh.port) for n in node_specs)
    r = WalePhysicalRecovery(
        inputs=inputs,
        layout=A9sLayout(postgres_major=spec.target.postgres_major_version),
        nodes=nodes,
    )

    async def window_known(ctx: StepContext) -> bool:
        return "recoveryWindow" in ctx.status.facts

    async def backup_chosen(ctx: StepContext) -> bool:
        return ctx.status.backup.id is not None and "recoveryTarget" in ctx.status.facts

    async def wal_fetched(ctx: StepContext) -> bool:
        return "walSegments" in ctx.status.facts

    def run_id_step(
        name: str, op: Callable[[A9sOperations, ClusterView, str], Awaitable[StepResult]]
    ) -> Step:
        async def apply(ctx: StepContext) -> None:
            ops = await r.ops(ctx)
            await r.note(ctx, await op(ops, r.view(ctx), r.run_id(ctx)))

        return FunctionStep(name, _never, apply, verify_after=False)

    steps: dict[Phase, list[Step]] = {
        Phase.FETCHING: [
            FunctionStep("resolve-archive", window_known, r.resolve_archive,
                         verify_after=False),
            FunctionStep("choose-base-backup", backup_chosen, r.choose_backup),
            FunctionStep("download-base-backup", r.parts_downloaded, r.download_base_backup),
            FunctionStep("verify-base-backup", r.sysid_checked, r.verify_base_backup),
            FunctionStep("fetch-wal", wal_fetched, r.fetch_wal),
            FunctionStep("probe-cluster", _never, r.probe_cluster, verify_after=False),
            FunctionStep("check-cluster-tools", _tools_checked, r.check_cluster_tools,
                         verify_after=False),
            FunctionStep("plan-disk-space", _never, r.plan_space, verify_after=False),
        ],
        Phase.DECRYPTING: [
            FunctionStep("ensure-wal-staged", r.wal_staged, r.stage_wal),
        ],
        Phase.STAGING: [
            r.cluster_step("ensure-standbys-stopped", lambda o, v: o.ensure_standbys_stopped(v)),
            r.cluster_step(
                "ensure-repmgr-stopped-on-primary",
                lambda o, v: o.ensure_repmgr_stopped_on_primary(v),
            ),
            r.cluster_step(
                "ensure-connections-blocked", lambda o, v: o.ensure_connections_blocked(v)
            ),
            r.cluster_step(
                "ensure-startup-locks-clear", lambda o, v: o.ensure_startup_locks_clear(v)
            ),
        ],
        Phase.RESTORING: [
            r.phys_step("ensure-postgres-stopped-on-primary",
                        lambda p, n, run: p.ensure_postgres_stopped(n), "primaryStopped"),
            FunctionStep("ensure-data-dir-replaced", _never, r.replace_data_dir,
                         verify_after=False),
            FunctionStep("ensure-base-backup-extracted", r.extracted, r.extract_base_backup),
            FunctionStep("ensure-recovery-configured", r.recovery_configured,
                         r.configure_recovery),
            r.phys_step("ensure-recovery-started",
                        lambda p, n, run: p.ensure_recovery_started(n)),
            FunctionStep("wait-for-promotion", r.promoted, r.wait_promotion),
            r.phys_step("ensure-recovery-settings-removed",
                        lambda p, n, run: p.ensure_recovery_settings_removed(n)),
        ],
        Phase.REJOINED: [
            run_id_step(
                "ensure-repmgr-schema-truncated",
                lambda o, v, run: o.ensure_repmgr_schema_truncated(v, run),
            ),
            FunctionStep("ensure-primary-registered", _never, r.register_primary,
                         verify_after=False),
            r.cluster_step(
                "ensure-repmgr-running-on-primary",
                lambda o, v: o.ensure_repmgr_running_on_primary(v),
            ),
            run_id_step("ensure-clone-marker", lambda o, v, run: o.ensure_clone_marker(v, run)),
        ],
    }
    for node in nodes:

        async def is_primary(ctx: StepContext, node: Node = node) -> bool:
            return ctx.status.primary == node.name

        async def reclone(ctx: StepContext, node: Node = node) -> None:
            ops = await r.ops(ctx)
            view = r.view(ctx)
            await ctx.update(lambda s: st.update_node(
                s, NodeState(name=node.name, role="standby", state="recloning")))
            result = await ops.ensure_standby_recloned(view, node, r.run_id(ctx))
            await ctx.update(lambda s: st.update_node(
                s, NodeState(name=node.name, role="standby", state="streaming")))
            await r.note(ctx, result)

        steps[Phase.REJOINED].append(FunctionStep(
            f"ensure-standby-recloned-{node.name.replace('/', '-')}", is_primary, reclone,
            verify_after=False,
        ))
    steps[Phase.REJOINED] += [
        FunctionStep("verify-cluster", _never, r.verify_cluster, verify_after=False),
        FunctionStep("ensure-leftovers-removed", _never, r.leftovers_removed,
                     verify_after=False),
        r.cluster_step(
            "ensure-connections-unblocked", lambda o, v: o.ensure_connections_unblocked(v)
        ),
    ]
    steps[Phase.REJOINED] = with_recovery_files_removed(r, steps[Phase.REJOINED])
    return Plan(steps=steps, closers=[r.close], leftovers=r, state_words=STATE_WORDS,
                observe_nodes=r.observed_nodes)
