"""The a9s-pg logical recovery plan: the runbook's steps, phase by phase.

Why this module exists: it names the logical recovery's steps in order and binds them to the
parts that do them — the cluster side shared with the WAL-E plan (`a9s_cluster`: Fetching's
cluster checks, Staging, Rejoined, cleanup), the dump's staging (`logical_staging`), its
restore (`logical_restore`) and its proof (`logical_proof`) — and holds what they share: the
backup, pinned once, and its key.

Decisions recorded here:
- The backup is chosen once (in Fetching) and then pinned in `status.backup.id`, so a backup
  that appears during a long recovery never changes what is restored.
- Fetching only checks (backup, key, nodes, tools, disk space); the bytes move in Decrypting.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from pgrecovery.backups.config import Digest, EncryptionKey
from pgrecovery.backups.listing import Backup, list_backups, select_backup
from pgrecovery.backups.pipeline import check_key
from pgrecovery.backups.progress import human_size
from pgrecovery.backups.sources import StorePartsSource
from pgrecovery.cluster.a9s import A9sOperations, StepResult, estimate_needed_bytes
from pgrecovery.cluster.nodes import A9sLayout, ClusterView, run_id_for
from pgrecovery.cluster.restore_job import cancel_restore_jobs
from pgrecovery.engine import status as st
from pgrecovery.engine.phases import Phase
from pgrecovery.engine.plan import Plan, PlanInputs
from pgrecovery.engine.status import BackupInfo, ConditionType, RecoveryStatus
from pgrecovery.engine.steps import FunctionStep, Step, StepContext, self_checking
from pgrecovery.errors import FatalError, InsufficientSpace
from pgrecovery.plans.a9s_cluster import (
    A9sPgCluster,
    rejoined_steps,
    staging_steps,
    tools_checked,
)
from pgrecovery.plans.a9s_leftovers import RecoveryFiles
from pgrecovery.plans.base import target_nodes
from pgrecovery.plans.logical_proof import RestoreProofSteps
from pgrecovery.plans.logical_restore import DumpRestore
from pgrecovery.plans.logical_staging import DumpStaging, index_path
from pgrecovery.plans.state_words import STATE_WORDS

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class A9sLogicalRecovery(A9sPgCluster):
    """One phase run of a logical recovery: the a9s-pg cluster side (`A9sPgCluster`) and the
    backup, its key, the staged dump and its restore."""

    _backup: Backup | None = None
    _newest: Backup | None = None
    _key: EncryptionKey | None = None

    async def encryption_key(self) -> EncryptionKey:
        if self._key is None:
            encryption = self.spec.source.encryption
            if encryption is None:
                raise FatalError("a9sLogical needs spec.source.encryption", reason="InvalidSpec")
            raw = await self.inputs.secrets.get_key(encryption.key_secret_ref)
            self._key = EncryptionKey.from_file_content(raw)
        return self._key

    @property
    def digest(self) -> Digest:
        encryption = self.spec.source.encryption
        return Digest(encryption.digest) if encryption is not None else Digest.AUTO

    # ------------------------------------------------------------------ pinned facts

    async def backup(self, ctx: StepContext) -> Backup:
        """The backup pinned in status (listing again to get its parts and sizes)."""
        if self._backup is None:
            pinned = ctx.status.backup.id
            listing = await list_backups(
                await self.store(),
                self.spec.source.backup_guid,
                prefix=self.location.prefix,
            )
            for ignored in listing.ignored[:20]:
                log.warning("ignored object in backup store: %s", ignored)
            self._backup = select_backup(listing, pinned or self.spec.source.backup_id)
            self._newest = listing.latest
        return self._backup

    def run_id_of(self, status: RecoveryStatus) -> str:
        backup_id = status.backup.id
        if backup_id is None:
            raise FatalError("no backup pinned in status", reason="InternalError")
        return run_id_for(backup_id, self.inputs.uid.replace("-", "")[:8])

    def staged_dump_of(self, status: RecoveryStatus) -> str | None:
        return status.backup.id

    def owned_work_paths(self) -> list[Path]:
        """The kept parts and the dump index."""
        index = index_path(self.work_dir)
        return [self.parts_dir(), index, index.with_name(index.name + ".tmp")]

    async def cancel_jobs(self, ops: A9sOperations, status: RecoveryStatus) -> None:
        """The restore job (serial or parallel, on whichever node was the primary), then the
        clones."""
        backup_id = status.backup.id
        if backup_id is not None:
            await cancel_restore_jobs(ops, self.nodes, backup_id, self.run_id_of(status))
        await super().cancel_jobs(ops, status)

    # ------------------------------------------------------------------ Fetching

    async def resolve_backup(self, ctx: StepContext) -> None:
        backup = await self.backup(ctx)
        info = BackupInfo(
            id=backup.backup_id,
            taken_at=backup.taken_at,
            parts=backup.part_count,
            size_bytes=backup.total_size,
        )
        await ctx.update(lambda s: st.set_backup(s, info))
        await ctx.update(
            lambda s: st.set_message(
                s,
                f"backup {backup.backup_id} taken {backup.taken_at:%Y-%m-%d %H:%M:%S}Z: "
                f"{backup.part_count} part(s), {human_size(backup.total_size)}",
            )
        )
        newest = self._newest
        if newest is not None and newest.taken_at > backup.taken_at:
            warning = ghost_deployment_warning(backup, newest)
            now = st.now_utc()
            await ctx.update(lambda s: st.set_condition(
                s, ConditionType.GHOST_DEPLOYMENTS_POSSIBLE, True, "OlderBackup", warning, now))

    async def check_encryption_key(self, ctx: StepContext) -> None:
        backup = await self.backup(ctx)
        source = StorePartsSource(await self.store(), backup)
        params = await check_key(source, await self.encryption_key(), self.digest)
        await ctx.fact(keyDigest=str(getattr(params, "digest", self.digest.value)))

    async def check_free_space(self, ctx: StepContext) -> None:
        ops = await self.ops(ctx)
        backup = await self.backup(ctx)
        view = self.view(ctx)
        staged = await ops.staged_dump(view.primary, backup.backup_id)
        needed = estimate_needed_bytes(
            compressed_size=backup.total_size, already_staged=staged.size if staged else 0
        )
        space = await ops.check_free_space(view.primary, needed)
        await ctx.fact(freeBytesOnPrimary=str(space.available), neededBytes=str(space.needed))
        # The parts are kept on the operator's work volume as they stream by (for resumes):
        # a volume too small would fail half-way through Decrypting, so say it now.
        self.parts_dir().mkdir(parents=True, exist_ok=True)
        kept = sum(
            (self.parts_dir() / p.name).stat().st_size
            for p in backup.parts
            if (self.parts_dir() / p.name).exists()
        )
        free = shutil.disk_usage(self.parts_dir()).free
        if staged is None and free < backup.total_size - kept:
            raise InsufficientSpace(
                f"the operator's work volume ({self.work_dir}) has {human_size(free)} free but the "
                f"backup's parts need {human_size(backup.total_size - kept)}; give the operator a "
                "larger work volume (Helm value workVolume) or set PGRECOVERY_WORK_DIR"
            )

    def parts_dir(self) -> Path:
        return self.work_dir / "parts"

    async def apply_roles_sql(self, ctx: StepContext) -> None:
        ops = await self.ops(ctx)
        await self.note(ctx, await ops.apply_roles_sql(self.view(ctx), self.run_id(ctx)))


async def build_a9s_logical_plan(inputs: PlanInputs) -> Plan:
    spec = inputs.spec
    recovery = A9sLogicalRecovery(
        inputs=inputs,
        layout=A9sLayout(postgres_major=spec.target.postgres_major_version),
        nodes=target_nodes(spec),
    )

    async def backup_pinned(ctx: StepContext) -> bool:
        return ctx.status.backup.id is not None and ctx.status.backup.parts is not None

    async def key_checked(ctx: StepContext) -> bool:
        return "keyDigest" in ctx.status.facts

    async def primary_known(ctx: StepContext) -> bool:
        return ctx.status.primary is not None and "freeBytesOnPrimary" in ctx.status.facts

    r = recovery
    staging = DumpStaging(recovery=r)
    restore = DumpRestore(cluster=r, load_index=staging.load_index)
    proof = RestoreProofSteps(cluster=r, load_index=staging.load_index)
    steps: dict[Phase, list[Step]] = {
        Phase.FETCHING: [
            FunctionStep("resolve-backup", backup_pinned, r.resolve_backup),
            FunctionStep(
                "check-encryption-key", key_checked, r.check_encryption_key, verify_after=False
            ),
            self_checking("probe-cluster", r.probe_cluster),
            FunctionStep("check-cluster-tools", tools_checked, r.check_cluster_tools,
                         verify_after=False),
            self_checking("check-free-space", r.check_free_space),
        ],
        Phase.DECRYPTING: [
            FunctionStep("ensure-restore-dir", staging.restore_dir_ready,
                         staging.ensure_restore_dir, verify_after=False),
            FunctionStep("stage-dump", staging.dump_staged, staging.stage_dump),
            self_checking("check-existing-databases", staging.check_existing_databases),
        ],
        Phase.STAGING: staging_steps(r, drop_inactive_slots=True),
        Phase.RESTORING: [
            FunctionStep("ensure-bulk-load-settings", restore.restore_done,
                         restore.apply_bulk_load_settings, verify_after=False),
            FunctionStep("restore-dump", restore.restore_done, restore.restore_dump),
        ],
        Phase.REJOINED: rejoined_steps(
            r,
            before_unblock=[
                # Before the connections are allowed again: nothing but the restore has
                # written yet.
                self_checking("prove-restore-on-standbys", proof.prove_restore_on_standbys),
                self_checking("ensure-staging-file-removed", _apply_with(
                    r, lambda o, v, ctx: o.ensure_staging_file_removed(
                        v, ctx.status.backup.id or ""))),
            ],
        ),
    }
    if spec.restore.wal_free_load:
        steps[Phase.RESTORING].insert(1, FunctionStep(
            "ensure-wal-free-settings", restore.restore_done, restore.apply_wal_free_settings,
            verify_after=False))
    if spec.restore.replace_existing_databases:
        steps[Phase.RESTORING].insert(0, FunctionStep(
            "ensure-databases-replaced", staging.databases_replaced,
            staging.replace_existing_databases, verify_after=False))
    if spec.target.new_site:
        steps[Phase.RESTORING].append(
            self_checking("apply-site-roles", r.apply_roles_sql)
        )
    steps[Phase.RESTORING] += [
        # Before Rejoined: the standbys' clones must get the original postgresql.auto.conf.
        self_checking("ensure-bulk-load-settings-reverted", restore.revert_bulk_load_settings),
        # Always (a marker of an earlier run, whatever this run's spec says): before Rejoined,
        # whose re-clone needs wal_level replica and a WAL sender.
        self_checking("ensure-wal-free-settings-reverted", restore.revert_wal_free_settings),
        # Last in Restoring: a restore that is not complete fails before the standbys are
        # wiped. Both proof steps check inside apply (as the cluster steps do), so a resumed
        # phase that re-runs the steps before them records them again in plan order.
        self_checking("prove-restore-on-primary", proof.prove_restore_on_primary),
    ]
    return Plan(steps=steps, closers=[recovery.close], leftovers=RecoveryFiles(recovery),
                state_words=STATE_WORDS, observe_nodes=recovery.observed_nodes)


def ghost_deployment_warning(restored: Backup, newest: Backup) -> str:
    """What to tell when an older backup than the newest is restored (a9s runbook,
    "Limitations"): the framework's database forgets what was created since."""
    hours = (newest.taken_at - restored.taken_at).total_seconds() / 3600
    return (
        f"restoring backup {restored.backup_id} taken {restored.taken_at:%Y-%m-%d %H:%M}Z, "
        f"{hours:.1f} h older than the newest backup {newest.backup_id} "
        f"({newest.taken_at:%Y-%m-%d %H:%M}Z{'' if newest.complete else ', incomplete'}). If "
        "this a9s-pg backs the a9s framework (service broker, deployer), service instances "
        f"created after {restored.taken_at:%Y-%m-%d %H:%M}Z stay deployed but unknown to it "
        "(ghost deployments): compare `bosh deployments` with the broker's instances after the "
        "recovery (README, 'Ghost deployments')"
    )


def _apply_with(
    r: A9sLogicalRecovery,
    op: Callable[[A9sOperations, ClusterView, StepContext], Awaitable[StepResult]],
) -> Callable[[StepContext], Awaitable[None]]:
    async def apply(ctx: StepContext) -> None:
        ops = await r.ops(ctx)
        await r.note(ctx, await op(ops, r.view(ctx), ctx))

    return apply
