"""The Dingo plan: restore a deleted service instance's WAL-E archive into a new instance.

Why this module exists: it is the Dingo runbook ("Recover user's deleted service") as phases of
idempotent steps, binding the WAL-E reader (`backups.wale`: is there an archive with base
backups and a system id?), the archive clone (`cluster.dingo_archive`) and the cell operations
(`cluster.dingo`). The old archive's location is derived from the GUID and the bucket (no log
digging): `spec.source.s3.prefix` when set, else `backups/<backupGuid>/wal/`; the new
instance's is the same with `target.dingo.instanceId`.

Phases (the runbook's order; nothing destructive before Staging, and Staging only with
`confirm`):
- Fetching: list the old archive (complete base backups, `sysids/sysid`, no WAL gap from the
  latest base backup to the newest segment on the newest timeline), download
  and verify the latest base backup (every lzop checksum; its pg_control's system id equals
  `sysids/sysid`) on the work volume, find the new instance's container on the cells, read its
  etcd keys, list its archive prefix.
- Decrypting: nothing (Dingo archives are not encrypted here).
- Staging: stop the container (it must stop writing its archive first, as the runbook says),
  empty the new prefix, copy the old archive into it server-side, verify counts and sizes.
  Never a sync: a sync keeps the new instance's own sysid and base backup (formats.md).
- Restoring: delete etcd `/service/<id>/initialize` and `/optime/leader`, wipe the container's
  data directory, start the container.
- Rejoined: wait until the container has restored, holds the leader key and accepts
  connections; verify the restored system id is the OLD archive's (pg_control and etcd) and
  that its position is past the start of the archive's last segment.

Resuming: one-shot destructive steps (emptying, etcd deletes, wipe) record a fact when done and
are skipped afterwards, because their "state holds" would be undone by the container's own
start-up (it writes `/initialize` and its data directory again).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

from pgrecovery import metrics
from pgrecovery.adapters.objectstore import WritableObjectStore
from pgrecovery.adapters.ssh import SshAuth, SshPool
from pgrecovery.backups.progress import human_size
from pgrecovery.backups.wale.archive import Archive, BaseBackup, list_archive, load_details
from pgrecovery.backups.wale.fetch import (
    SystemIdMismatch,
    download,
    local_name,
    verify_base_backup,
)
from pgrecovery.backups.wale.layout import default_prefix, normalise_prefix
from pgrecovery.backups.wale.planning import (
    check_backup_on_path,
    last_segment,
    required_segments,
    timeline_path,
)
from pgrecovery.cluster.dingo import Container, DingoOperations, etcd_base_url
from pgrecovery.cluster.dingo_archive import (
    clone_prefix,
    empty_prefix,
    summarize,
    verify_clone,
)
from pgrecovery.cluster.nodes import Node
from pgrecovery.engine import status as st
from pgrecovery.engine.phases import Phase
from pgrecovery.engine.plan import Plan, PlanInputs
from pgrecovery.engine.spec import DingoTarget
from pgrecovery.engine.status import BackupInfo, NodeState
from pgrecovery.engine.steps import FunctionStep, Step, StepContext, self_checking
from pgrecovery.errors import (
    BackupCorrupt,
    BackupIncomplete,
    ClusterError,
    ConfigurationError,
    InvalidSpec,
)
from pgrecovery.plans.base import PlanBase, fact_recorded, target_nodes
from pgrecovery.plans.bosh_access import BoshAccess
from pgrecovery.plans.dingo_container import ContainerSteps

# target.bosh of a Dingo recovery without instanceGroup: the cells' group (a9s-pg's default,
# `pg`, names no cell).
DEFAULT_CELL_GROUP = "cell"
# Progress of the archive steps is pushed into status at most this often.
PROGRESS_INTERVAL = 1.0


@dataclass(kw_only=True)
class DingoRecovery(PlanBase):
    """One phase run of a Dingo recovery: the store and its closing (`PlanBase`), the cells
    over SSH, the container, etcd."""

    nodes: tuple[Node, ...]

    _dingo_ops: DingoOperations | None = None
    _container: Container | None = None

    @property
    def dingo(self) -> DingoTarget:
        dingo = self.spec.target.dingo
        if dingo is None:  # the model guarantees it for type dingo
            raise InvalidSpec("target.dingo is required", field="spec.target.dingo")
        return dingo

    # ------------------------------------------------------------------ where
    @property
    def old_prefix(self) -> str:
        s3 = self.spec.source.s3
        given = normalise_prefix(s3.prefix) if s3 is not None else ""
        return given or default_prefix(self.spec.source.backup_guid)

    @property
    def new_prefix(self) -> str:
        guid, new = self.spec.source.backup_guid, self.dingo.instance_id
        if self.old_prefix == default_prefix(guid):
            return default_prefix(new)
        if self.old_prefix.count(guid) != 1:
            raise InvalidSpec(
                f"cannot derive the new instance's archive from prefix {self.old_prefix!r}: it "
                "must contain source.backupGuid once (Dingo: backups/<guid>/wal/)",
                field="spec.source.s3.prefix",
            )
        return self.old_prefix.replace(guid, new)

    async def writable_store(self) -> WritableObjectStore:
        store = await self.store()
        if not isinstance(store, WritableObjectStore):
            raise ConfigurationError("the Dingo recovery copies objects: it needs an S3 store")
        return store

    async def old_archive(self) -> Archive:
        store = await self.writable_store()
        archive = await list_archive(store, self.old_prefix)
        await load_details(store, archive)
        return archive

    async def latest_backup(self, ctx: StepContext) -> BaseBackup:
        """The base backup the container will restore (`backup-fetch LATEST`), as pinned."""
        archive = await self.old_archive()
        pinned = ctx.status.backup.id
        for backup in archive.complete_backups:
            if backup.name.name == pinned:
                return backup
        raise BackupIncomplete(f"base backup {pinned} is no longer in {archive.where('')}")

    @property
    def wale_dir(self) -> Path:
        return Path(self.inputs.work_dir) / "wale"

    async def cell_ops(self, ctx: StepContext) -> DingoOperations:
        """The cells over SSH: the VMs `target.nodes` names with `target.ssh`, or — with
        `target.bosh` — the cell group the director lists (pinned in Fetching), opened with
        an ephemeral user that the closer removes (`bosh_access`, as for a9s-pg)."""
        if self._dingo_ops is None:
            bosh = self.spec.target.bosh
            if bosh is not None:
                if "instance_group" not in bosh.model_fields_set:
                    bosh = bosh.model_copy(update={"instance_group": DEFAULT_CELL_GROUP})
                access = BoshAccess(bosh, self.spec.target.deployment, self.inputs.uid,
                                    self.inputs.secrets)
                self.on_close(access.close)
                auth, self.nodes = await access.open(ctx, None)
            else:
                _, ssh = self.spec.target.require_nodes()
                key = await self.inputs.secrets.get_key(ssh.private_key_secret_ref)
                known_hosts = await self.inputs.secrets.get_key(ssh.known_hosts_secret_ref)
                auth = SshAuth(username=ssh.user, private_key=key,
                               known_hosts=known_hosts.decode())
            pool = SshPool(auth)
            self.on_close(pool.close)
            self._dingo_ops = DingoOperations(pool, self.nodes)
        return self._dingo_ops

    async def container(self, ctx: StepContext) -> Container:
        """The new instance's container; after Fetching, the one pinned in status."""
        if self._container is None:
            ops = await self.cell_ops(ctx)
            name = ctx.status.facts.get("container") or self.dingo.container
            found = await ops.find_container(self.dingo.instance_id, name)
            pinned = ctx.status.facts.get("containerId")
            if pinned is not None and found.id != pinned:
                # Same name, another container: someone recreated it since Fetching; what
                # was checked then no longer describes it.
                raise ClusterError(
                    f"{found.label} is not the container found in Fetching ({pinned[:12]}); "
                    "it was recreated: start a new recovery",
                    reason="ContainerReplaced",
                )
            self._container = found
        return self._container

    def etcd(self, container: Container) -> str:
        return etcd_base_url(container, self.dingo.etcd.endpoint)

    async def node_state(self, ctx: StepContext, state: str) -> None:
        container = await self.container(ctx)
        node = NodeState(name=container.node.name, role="cell", state=state)
        await ctx.update(lambda s: st.set_nodes(s, (node,)))

    # ------------------------------------------------------------------ Fetching
    async def resolve_archive(self, ctx: StepContext) -> None:
        store = await self.writable_store()
        archive = await self.old_archive()
        if archive.sysid is None:
            raise BackupIncomplete(
                f"{archive.where('sysids/sysid')} is missing: the restored container could not "
                'set its etcd /initialize from it (Dingo: "Target missing /sysids/sysid")'
            )
        latest = archive.complete_backups[-1]
        # What the container will replay: the latest base backup, then every segment up to
        # the newest along the newest timeline (PostgreSQL's recovery_target_timeline=latest).
        # A gap would end the replay early and silently lose everything after it.
        path = timeline_path(archive)
        check_backup_on_path(latest, path, archive)
        last = last_segment(archive, path)
        if last is None:
            raise BackupIncomplete(f"no WAL segment on the newest timeline in {archive.where('')}")
        replay = required_segments(
            archive, path, latest.name.first_segno, last.segno,
            f"needed after base backup {latest.name.name}",
        )  # fmt: skip
        objects = await store.list(self.old_prefix)
        total = summarize(objects)
        info = BackupInfo(id=latest.name.name, parts=total.objects, size_bytes=total.bytes)
        await ctx.update(lambda s: st.set_backup(s, info))
        await ctx.fact(
            oldArchive=archive.where(""),
            newArchive=f"{store.description.rstrip('/')}/{self.new_prefix}",
            oldSysid=str(archive.sysid),
            baseBackups=str(len(archive.complete_backups)),
            walSegments=str(len(archive.segments)),
            lastSegment=last.name,
            archiveEndLsn=str(last.start_lsn),
        )
        await self.say(
            ctx,
            f"archive of deleted instance {self.spec.source.backup_guid}: "
            f"{len(archive.complete_backups)} base backup(s), latest {latest.name.name}, "
            f"{len(replay)} WAL segment(s) to replay up to {last.name}, {total.objects} objects, "
            f"{human_size(total.bytes)}, system id {archive.sysid}",
        )

    async def archive_resolved(self, ctx: StepContext) -> bool:
        return ctx.status.backup.id is not None and "oldSysid" in ctx.status.facts

    async def download_base_backup(self, ctx: StepContext) -> None:
        backup = await self.latest_backup(ctx)
        store = await self.writable_store()
        self.wale_dir.mkdir(parents=True, exist_ok=True)
        total, done, last = backup.compressed_size, [0], [0.0]

        def on_bytes(n: int) -> None:
            done[0] += n
            metrics.record_bytes("fetched", n)

        for part in backup.parts:
            await download(store, part, self.wale_dir, on_bytes)
            if time.monotonic() - last[0] >= PROGRESS_INTERVAL:
                last[0] = time.monotonic()
                await ctx.progress(
                    done[0],
                    total,
                    f"base backup {backup.name.name} downloaded "
                    f"{human_size(done[0])} of {human_size(total)} (for verification)",
                )

    async def verify_base_backup(self, ctx: StepContext) -> None:
        """Every lzop checksum of the base backup the container will restore, and its
        pg_control's system id against `sysids/sysid`: a corrupt or mixed archive fails here,
        before the new instance is touched, not after its data directory is wiped."""
        backup = await self.latest_backup(ctx)
        parts = [(self.wale_dir / local_name(p.key), p.key) for p in backup.parts]
        sysid, expanded = await asyncio.to_thread(verify_base_backup, parts)
        want = ctx.status.facts.get("oldSysid")
        if sysid is None:
            raise BackupCorrupt(
                f"base backup {backup.name.name} holds no global/pg_control; it is not a "
                "PostgreSQL base backup"
            )
        if str(sysid) != want:
            raise SystemIdMismatch(
                f"base backup {backup.name.name} is of database system {sysid}, but "
                f"sysids/sysid says {want}: the archive mixes two clusters (e.g. after an "
                "`aws s3 sync` into it); the container would refuse it"
            )
        await ctx.fact(backupSysid=str(sysid), expandedBytes=str(expanded))
        for path, _ in parts:  # verified; the container fetches its own copy from S3
            path.unlink(missing_ok=True)

    async def find_container(self, ctx: StepContext) -> None:
        self._container = None
        ops = await self.cell_ops(ctx)
        container = await ops.find_container(self.dingo.instance_id, self.dingo.container)
        bucket = self.spec.source.s3.bucket if self.spec.source.s3 is not None else None
        if container.archive_bucket is not None and container.archive_bucket != bucket:
            # The container restores from its own bucket: a copy into another one would
            # never be read, and the wiped instance would start empty.
            raise ClusterError(
                f"{container.label} archives to bucket {container.archive_bucket}, not "
                f"{bucket} (spec.source.s3.bucket); the clone must go where it restores from",
                reason="ArchiveMismatch",
            )
        self._container = container
        etcd = self.etcd(container)
        await ctx.fact(
            container=container.name,
            containerId=container.id,
            cell=container.node.name,
            dataDir=container.data_dir,
            etcd=etcd,
        )
        await ctx.update(lambda s: s.model_copy(update={"primary": container.node.name}))
        await self.node_state(ctx, "running" if container.running else "stopped")

    async def check_etcd(self, ctx: StepContext) -> None:
        ops = await self.cell_ops(ctx)
        container = await self.container(ctx)
        initialize = await ops.etcd_get(container, self.etcd(container), "initialize")
        leader = await ops.etcd_get(container, self.etcd(container), "leader")
        await ctx.fact(newSysid=initialize or "none", newLeader=leader or "none")

    async def check_new_archive(self, ctx: StepContext) -> None:
        store = await self.writable_store()
        found = summarize(await store.list(self.new_prefix))
        await ctx.fact(newArchiveBefore=str(found))
        await self.say(
            ctx,
            f"new instance {self.dingo.instance_id}: {(await self.container(ctx)).label}, "
            f"its archive holds {found} (to be replaced)",
        )

    async def empty_new_archive(self, ctx: StepContext) -> None:
        store = await self.writable_store()
        removed = await empty_prefix(store, self.new_prefix, protect=self.old_prefix)
        await ctx.fact(newArchiveEmptied=str(removed))
        await self.say(ctx, f"emptied {self.new_prefix}: removed {removed}")

    async def archive_cloned(self, ctx: StepContext) -> bool:
        try:
            await verify_clone(await self.writable_store(), self.old_prefix, self.new_prefix)
        except BackupIncomplete:
            return False
        return "newArchiveEmptied" in ctx.status.facts

    async def clone_archive(self, ctx: StepContext) -> None:
        store = await self.writable_store()
        last = [0.0]

        async def progress(done: int, total: int, detail: str) -> None:
            if time.monotonic() - last[0] >= PROGRESS_INTERVAL or done == total:
                last[0] = time.monotonic()
                await ctx.progress(done, total, detail)

        result = await clone_prefix(store, self.old_prefix, self.new_prefix, progress=progress)
        metrics.record_bytes("copied", result.copied_bytes)
        await ctx.fact(archiveCloned=str(result.total))
        await self.say(
            ctx,
            f"copied {result.copied} object(s) ({human_size(result.copied_bytes)}) server-side; "
            f"{self.new_prefix} now equals the old archive: {result.total}",
        )

async def build_dingo_plan(inputs: PlanInputs) -> Plan:
    spec = inputs.spec
    r = DingoRecovery(inputs=inputs, nodes=target_nodes(spec))
    # Derive both prefixes now: a prefix the new one cannot be derived from fails in Pending.
    if r.old_prefix == r.new_prefix:
        raise InvalidSpec("old and new archive prefixes are equal", field="spec.target.dingo")
    cell = ContainerSteps(recovery=r)
    steps: dict[Phase, list[Step]] = {
        Phase.FETCHING: [
            FunctionStep("resolve-archive", r.archive_resolved, r.resolve_archive),
            FunctionStep(
                "download-base-backup",
                fact_recorded("backupSysid"),
                r.download_base_backup,
                verify_after=False,
            ),
            FunctionStep("verify-base-backup", fact_recorded("backupSysid"), r.verify_base_backup),
            self_checking("find-container", r.find_container),
            self_checking("check-etcd", r.check_etcd),
            self_checking("check-new-archive", r.check_new_archive),
        ],
        Phase.DECRYPTING: [],
        Phase.STAGING: [
            FunctionStep("ensure-container-stopped", cell.container_stopped, cell.stop_container),
            FunctionStep("ensure-new-archive-emptied", fact_recorded("newArchiveEmptied"),
                         r.empty_new_archive),
            FunctionStep("ensure-archive-cloned", r.archive_cloned, r.clone_archive),
        ],
        Phase.RESTORING: [
            FunctionStep("ensure-etcd-keys-deleted", fact_recorded("etcdKeysDeleted"),
                         cell.delete_etcd_keys),
            FunctionStep("ensure-data-dir-wiped", fact_recorded("dataDirWiped"),
                         cell.wipe_data_dir),
            FunctionStep("ensure-container-started", cell.container_running, cell.start_container),
        ],
        Phase.REJOINED: [
            FunctionStep("ensure-restored", cell.restored, cell.wait_restored),
            self_checking("verify-system-id", cell.verify_system_id),
        ],
    }
    return Plan(steps=steps, closers=[r.close])
