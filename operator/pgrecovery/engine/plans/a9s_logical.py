"""The a9s-pg logical recovery plan: the runbook's steps, phase by phase.

Why this module exists: it binds the engine's phases to the backups layer (find, fetch, decrypt)
and the cluster layer (the a9s-pg runbook over SSH), and records in status everything a resumed
run needs (the chosen backup id, the primary, the staged dump's checksum). Each step is named for
the state it ensures; the cluster operations are idempotent themselves (check → apply → check
inside), so the steps here run them and report what changed.

Decisions recorded here:
- The backup is chosen once (in Fetching) and then pinned in `status.backup.id`, so a backup
  that appears during a long recovery never changes what is restored.
- The primary is found once (in Fetching) and pinned in `status.primary`; later phases rebuild
  the cluster view from it, because in Staging the standbys are stopped and cannot be probed.
- Fetching only checks (backup, key, nodes, disk space); the bytes move in Decrypting as one
  pipeline: parts stream from the store (kept on the work volume as they pass, for resumes),
  are decrypted and decompressed, and go straight into the primary's staging directory, where
  the SHA-256 is checked against the stream's. The stages overlap, so the phase takes about as
  long as the slowest of them, not their sum. The plain dump never touches the operator's disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgrecovery import metrics
from pgrecovery.adapters.jobs import JobState
from pgrecovery.adapters.objectstore import ObjectStore
from pgrecovery.adapters.ssh import SshAuth, SshPool, UploadResult, shell_script_argv
from pgrecovery.backups.config import (
    AzureLocation,
    Digest,
    EncryptionKey,
    S3Location,
)
from pgrecovery.backups.credentials import azure_credentials, s3_credentials
from pgrecovery.backups.listing import Backup, list_backups, select_backup
from pgrecovery.backups.pipeline import check_key
from pgrecovery.backups.sources import StorePartsSource
from pgrecovery.backups.stores import open_azure_store, open_s3_store
from pgrecovery.cluster import bulk_load, psql, restore_proof, tools, wal_free
from pgrecovery.cluster.a9s import A9sOperations, StepResult, estimate_needed_bytes
from pgrecovery.cluster.dump_index import DumpIndex, DumpIndexer
from pgrecovery.cluster.existing_databases import (
    Verdict,
    decide,
    drop_databases,
    existing_databases,
)
from pgrecovery.cluster.leftovers import list_leftovers, remove_leftovers
from pgrecovery.cluster.nodes import (
    A9sLayout,
    ClusterView,
    Node,
    NodeView,
    ProgressEvent,
    run_id_for,
)
from pgrecovery.cluster.parallel_restore import (
    ParallelRestoreStatus,
    parallel_restore_job_id,
    poll_parallel_restore,
    start_parallel_restore,
)
from pgrecovery.cluster.restore_script import default_concurrency
from pgrecovery.cluster.staged_dump import DumpMarker, check_reusable, discard, write_marker
from pgrecovery.engine import status as st
from pgrecovery.engine.phases import Phase
from pgrecovery.engine.plan import Plan, PlanInputs
from pgrecovery.engine.plans.bosh_access import BoshAccess
from pgrecovery.engine.plans.dump_stream import ReplayableDump, StageCounters, Tap
from pgrecovery.engine.spec import RecoverySpec
from pgrecovery.engine.status import BackupInfo, ConditionType, NodeState, RecoveryStatus
from pgrecovery.engine.steps import FunctionStep, Step, StepContext
from pgrecovery.errors import (
    DatabasesExist,
    FatalError,
    InsufficientSpace,
    NotReadyYet,
    RecoveryError,
    RestoreFailed,
    RestoreIncomplete,
)

log = logging.getLogger(__name__)

# Progress is pushed into status at most this often; callbacks from worker threads only
# update a holder, and a pump task copies it into status (never from a thread).
PROGRESS_PUMP_INTERVAL = 1.0
# How often the detached psql job is polled; psql output is classified on the VM's log.
RESTORE_POLL_INTERVAL = 2.0
# Bound on the restore: a dump that restores slower than 1 MB/s for its whole size means
# something is wrong; the floor leaves small dumps an hour.
RESTORE_MIN_TIMEOUT = 3600.0
# restoreConnections 0 = one session per CPU of the primary, but no more than this: beyond ~8
# sessions a restore gains little and adds WAL and lock contention (the spec allows up to 32).
AUTO_RESTORE_CONNECTIONS_MAX = 8


def _sessions_of(mode: str) -> int:
    """`parallel 4` → 4; `serial: …` → 1."""
    head, _, rest = mode.partition(" ")
    return int(rest) if head == "parallel" and rest.isdigit() else 1


@dataclass
class _IndexTap:
    """Feeds the streaming dump to `DumpIndexer`; writes the index when a pass reached the end."""

    path: Path
    indexer: DumpIndexer = field(default_factory=DumpIndexer)

    def feed(self, chunk: bytes) -> None:
        self.indexer.feed(chunk)

    def finish(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(self.indexer.finish().to_json())
        tmp.replace(self.path)


@dataclass
class _ProgressHolder:
    done: int = 0
    total: int | None = None
    detail: str = ""
    changed: bool = False

    def set(self, done: int, total: int | None, detail: str) -> None:
        self.done, self.total, self.detail, self.changed = done, total, detail, True


@contextlib.asynccontextmanager
async def _pumping(ctx: StepContext, holder: _ProgressHolder) -> Any:
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


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"  # pragma: no cover


@dataclass
class A9sLogicalRecovery:
    """Shared state of one phase run: clients are opened lazily and closed by the plan."""

    inputs: PlanInputs
    layout: A9sLayout
    nodes: tuple[Node, ...]
    _store: ObjectStore | None = None
    _pool: SshPool | None = None
    _ops: A9sOperations | None = None
    _backup: Backup | None = None
    _newest: Backup | None = None
    _key: EncryptionKey | None = None
    _ctx: StepContext | None = None
    _closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    @property
    def spec(self) -> RecoverySpec:
        return self.inputs.spec

    @property
    def work_dir(self) -> Path:
        return Path(self.inputs.work_dir)

    # ------------------------------------------------------------------ clients

    async def store(self) -> ObjectStore:
        if self._store is None:
            source = self.spec.source
            secrets = self.inputs.secrets
            if source.s3 is not None:
                creds = None
                if source.s3.credentials_secret_ref is not None:
                    values = await secrets.get_all(source.s3.credentials_secret_ref)
                    creds = s3_credentials(
                        values, f"Secret {source.s3.credentials_secret_ref.name}")
                location = S3Location(
                    bucket=source.s3.bucket,
                    region=source.s3.region,
                    endpoint=source.s3.endpoint,
                    prefix=source.s3.prefix,
                )
                self._store = await open_s3_store(location, creds)
            elif source.azure is not None:
                values = await secrets.get_all(source.azure.credentials_secret_ref)
                azure_creds = azure_credentials(
                    values, f"Secret {source.azure.credentials_secret_ref.name}")
                self._store = await open_azure_store(
                    AzureLocation(
                        container=source.azure.container, account_url=source.azure.account_url
                    ),
                    azure_creds,
                )
            else:  # the model guarantees one of both
                raise FatalError("no backup store configured", reason="InvalidSpec")
            self._closers.append(self._store.close)
        return self._store

    async def ops(self, ctx: StepContext) -> A9sOperations:
        self._ctx = ctx
        return await self._cluster_ops()

    async def _cluster_ops(self) -> A9sOperations:
        if self._ops is None:
            self._pool = SshPool(await self._ssh_auth())
            self._closers.append(self._pool.close)
            self._ops = A9sOperations(
                self._pool, self.nodes, layout=self.layout, progress=self._on_cluster_progress
            )
        return self._ops

    async def _ssh_auth(self) -> SshAuth:
        bosh = self.spec.target.bosh
        if bosh is not None:
            # The director finds the VMs (pinned in Fetching) and opens an ephemeral user;
            # the closer removes it when this phase run ends (plans/bosh_access.py).
            access = BoshAccess(bosh, self.spec.target.deployment, self.inputs.uid,
                                self.inputs.secrets)
            self._closers.append(access.close)
            auth, self.nodes = await access.open(self._ctx, None)
            return auth
        _, ssh = self.spec.target.require_nodes()
        key = await self.inputs.secrets.get_key(ssh.private_key_secret_ref)
        known_hosts = await self.inputs.secrets.get_key(ssh.known_hosts_secret_ref)
        return SshAuth(username=ssh.user, private_key=key, known_hosts=known_hosts.decode())

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
        return Digest(encryption.digest.value) if encryption is not None else Digest.AUTO

    def _on_cluster_progress(self, event: ProgressEvent) -> None:
        # Called synchronously by the cluster operations on the event loop; keep it cheap.
        log.info("%s%s: %s", event.step, f" [{event.node}]" if event.node else "", event.message)

    async def close(self) -> None:
        for closer in reversed(self._closers):
            with contextlib.suppress(Exception):
                await closer()

    # ------------------------------------------------------------------ pinned facts

    async def backup(self, ctx: StepContext) -> Backup:
        """The backup pinned in status (listing again to get its parts and sizes)."""
        if self._backup is None:
            pinned = ctx.status.backup.id
            listing = await list_backups(
                await self.store(),
                self.spec.source.backup_guid,
                prefix=self.spec.source.s3.prefix if self.spec.source.s3 else "",
            )
            for ignored in listing.ignored[:20]:
                log.warning("ignored object in backup store: %s", ignored)
            self._backup = select_backup(listing, pinned or self.spec.source.backup_id)
            self._newest = listing.latest
        return self._backup

    def view(self, ctx: StepContext) -> ClusterView:
        """The cluster as pinned in Fetching: the primary in status, the others standbys."""
        primary_name = ctx.status.primary
        if primary_name is None:
            raise FatalError(
                "the primary was not recorded in Fetching; the status was edited or lost",
                reason="InternalError",
            )
        primary = next(n for n in self.nodes if n.name == primary_name)
        standbys = tuple(n for n in self.nodes if n.name != primary_name)
        return ClusterView(primary=primary, standbys=standbys, nodes=())

    def run_id(self, ctx: StepContext) -> str:
        return self.run_id_of(ctx.status)

    def run_id_of(self, status: RecoveryStatus) -> str:
        backup_id = status.backup.id
        if backup_id is None:
            raise FatalError("no backup pinned in status", reason="InternalError")
        return run_id_for(backup_id, self.inputs.uid.replace("-", "")[:8])

    def staged_dump_of(self, status: RecoveryStatus) -> str | None:
        """The backup id whose plaintext dump this plan stages on the primary, if any."""
        return status.backup.id

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
                f"{backup.part_count} part(s), {_human(backup.total_size)}",
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

    async def probe_cluster(self, ctx: StepContext) -> None:
        ops = await self.ops(ctx)
        view = await ops.probe_nodes()
        states = tuple(_node_state(nv) for nv in view.nodes)
        await ctx.update(lambda s: st.set_nodes(s, states))
        await ctx.update(lambda s: s.model_copy(update={"primary": view.primary.name}))

    async def check_cluster_tools(self, ctx: StepContext) -> None:
        """Before anything destructive: every node has the helpers, functions, monit services
        and programs the later phases call, and how to call the helpers is pinned in status
        (`helperConvention`), so a resumed run calls them the same way (`cluster.tools`)."""
        ops = await self.ops(ctx)
        verdicts = await ops.check_cluster_tools(self.view(ctx).primary,
                                                 new_site=self.spec.target.new_site)
        primary = verdicts[0]
        if primary.convention is None:  # pragma: no cover - check_cluster_tools raised
            raise FatalError("helper convention undetermined", reason="InternalError")
        how = tools.describe(primary.convention, primary.repmgr_config)
        await ctx.fact(
            helperConvention=primary.convention.value,
            registerPrimaryVia=how[:400],
            repmgrConfig=primary.repmgr_config,
            clusterTools=tools.summarize(verdicts)[:900],
        )
        await ctx.update(lambda s: st.set_message(
            s, f"cluster tools checked on {len(verdicts)} node(s); {primary.node}: {how}"))

    async def register_primary(self, ctx: StepContext) -> None:
        """`register_master_node` the way the Fetching check found (fact `helperConvention`);
        a status from before that check decides on the primary now and records it."""
        ops = await self.ops(ctx)
        facts = ctx.status.facts
        pinned = facts.get("helperConvention")
        convention = tools.Convention(pinned) if pinned else None
        result = await ops.ensure_primary_registered(self.view(ctx), convention,
                                                     facts.get("repmgrConfig"))
        if convention is None and result.changed:
            await ctx.fact(registerPrimaryVia=result.message[:400])
        await self.note(ctx, result)

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
                f"the operator's work volume ({self.work_dir}) has {_human(free)} free but the "
                f"backup's parts need {_human(backup.total_size - kept)}; give the operator a "
                "larger work volume (Helm value workVolume) or set PGRECOVERY_WORK_DIR"
            )

    def parts_dir(self) -> Path:
        return self.work_dir / "parts"

    # ------------------------------------------------------------------ Decrypting

    async def restore_dir_ready(self, ctx: StepContext) -> bool:
        """The staging directory is there as the runbook makes it (read-only). A real check, so
        a restart later in Decrypting does not run the step again after stage-dump (its record
        would move behind stage-dump's in status.steps)."""
        ops = await self.ops(ctx)
        script = r"""
d=$1
if [ -d "$d" ] && [ "$(stat -c %U:%G "$d")" = root:vcap ] \
   && [ -n "$(find "$d" -maxdepth 0 -perm -g+w)" ]; then echo ready; else echo missing; fi
"""
        res = await ops.shell.run_root(self.view(ctx).primary.endpoint,
                                       shell_script_argv(script, ops.layout.restore_dir),
                                       timeout=60)
        return res.stdout.strip() == "ready"

    async def ensure_restore_dir(self, ctx: StepContext) -> None:
        ops = await self.ops(ctx)
        result = await ops.ensure_restore_dir(self.view(ctx).primary)
        await self.note(ctx, result)

    async def dump_staged(self, ctx: StepContext) -> bool:
        """This run staged (or re-used) the dump: its checksum is in status and on the VM, and
        the dump's index is on the work volume (else `stage_dump` takes it from the marker)."""
        backup_id = ctx.status.backup.id
        if backup_id is None or ctx.status.backup.plain_sha256 is None:
            return False
        if self.load_index(ctx.status.backup.plain_size_bytes)[0] is None:
            return False
        ops = await self.ops(ctx)
        staged = await ops.staged_dump(self.view(ctx).primary, backup_id)
        return staged is not None and staged.sha256 == ctx.status.backup.plain_sha256

    async def stage_dump(self, ctx: StepContext) -> None:
        """Fetch, decrypt, decompress and upload as one pipeline (overlapped, bounded memory).

        Parts are kept on the work volume as they stream by, so a retry after a dropped store
        or SSH connection fetches only what is missing, and the upload resumes at the byte the
        VM already has (the stream is replayable: decrypting again is local and fast).
        """
        ops = await self.ops(ctx)
        backup = await self.backup(ctx)
        view = self.view(ctx)
        if await self._reuse_staged_dump(ctx, ops, backup):
            return
        holder = _ProgressHolder(total=backup.total_size)
        last = {"fetched": 0, "decrypted": 0}

        def on_progress(c: StageCounters) -> None:
            metrics.record_bytes("fetched", max(0, c.fetched - last["fetched"]))
            metrics.record_bytes("decrypted", max(0, c.plain - last["decrypted"]))
            last["fetched"], last["decrypted"] = c.fetched, c.plain
            holder.set(
                c.decrypted,
                c.cipher_total,
                f"fetched {_human(c.fetched + c.reused)} of {_human(c.cipher_total)}"
                + (f" ({_human(c.reused)} kept from an earlier pass)" if c.reused else "")
                + f", decrypted {_human(c.decrypted)}, dump {_human(c.plain)}"
                f" → {view.primary.name} {_human(c.sent)} sent",
            )

        dump = ReplayableDump(
            store=await self.store(),
            backup=backup,
            parts_dir=self.parts_dir(),
            key=await self.encryption_key(),
            digest=self.digest,
            make_taps=self.dump_taps,
            on_progress=on_progress,
        )
        async with _pumping(ctx, holder):
            result = await ops.upload_dump(view.primary, dump, backup.backup_id)
        metrics.record_bytes("uploaded", result.size - result.resumed_from)
        await self._write_dump_marker(ctx, ops, backup, result)
        counters = dump.counters
        info = ctx.status.backup.model_copy(
            update={"plain_size_bytes": result.size, "plain_sha256": result.sha256}
        )
        await ctx.update(lambda s: st.set_backup(s, info))
        await ctx.fact(
            stagedDump=result.path,
            stagedBytes=(
                f"fetched {counters.fetched}, kept {counters.reused}, "
                f"decrypted {counters.decrypted}, plain {counters.plain}, "
                f"sent {result.size - result.resumed_from}"
                + (f" (resumed at {result.resumed_from})" if result.resumed_from else "")
            ),
        )
        await self.after_staged(ctx, result)
        # What the later phases trust (the dump's size and sha256) is durable before the next
        # step: a restart right after it does not hash the dump again to re-use it.
        await ctx.checkpoint()

    async def _reuse_staged_dump(self, ctx: StepContext, ops: A9sOperations,
                                 backup: Backup) -> bool:
        """A dump of this backup that an earlier run staged and verified is used as it is when
        its marker names this backup and the file hashes (on the VM, now) to the marker's
        sha256 (`cluster.staged_dump`); anything else found there is removed and staged again.
        Either way the fact `stagedDumpReuse` says what was decided and why."""
        primary = self.view(ctx).primary
        reuse = await check_reusable(ops.shell, primary, ops.layout, backup_id=backup.backup_id,
                                     cipher_size=backup.total_size, parts=backup.part_count)
        marker = reuse.marker
        if marker is None:
            if reuse.found:
                await discard(ops.shell, primary, ops.layout, backup.backup_id)
                await ctx.fact(stagedDumpReuse=f"not re-used: {reuse.why_not}; staged "
                                               "again"[:900])
            return False
        index = marker.dump_index()
        tmp = self.index_path().with_name(self.index_path().name + ".tmp")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(tmp.write_text, index.to_json())
        await asyncio.to_thread(tmp.replace, self.index_path())
        path = ops.layout.dump_path(backup.backup_id)
        # The checksum file this run's own checks read (an earlier version may not have left it).
        await ops.shell.run_root(primary.endpoint, shell_script_argv(
            'printf "%s\\n" "$2" > "$1.sha256.tmp" && mv -f "$1.sha256.tmp" "$1.sha256"',
            path, marker.plain_sha256), timeout=60)
        info = ctx.status.backup.model_copy(
            update={"plain_size_bytes": marker.plain_size, "plain_sha256": marker.plain_sha256})
        await ctx.update(lambda s: st.set_backup(s, info))
        await ctx.progress(marker.plain_size, marker.plain_size,
                           f"re-used the dump staged on {primary.name} "
                           f"({_human(marker.plain_size)})")
        await ctx.fact(
            stagedDump=path,
            stagedBytes=f"re-used {marker.plain_size} B staged earlier; fetched 0, decrypted 0, "
                        "sent 0",
            stagedDumpReuse=(f"re-used: {path} on {primary.name}, staged by run "
                             f"{marker.written_by or '?'}, {marker.plain_size} B, sha256 "
                             f"{marker.plain_sha256} verified on the VM against its marker; "
                             "not streamed again")[:900],
        )
        await ctx.update(lambda s: st.set_message(
            s, f"stage-dump: re-used the verified dump an earlier run staged on {primary.name} "
               f"({_human(marker.plain_size)}); nothing downloaded or decrypted"))
        await self.after_staged(ctx, UploadResult(path, marker.plain_size, marker.plain_sha256))
        await ctx.checkpoint()
        return True

    async def _write_dump_marker(self, ctx: StepContext, ops: A9sOperations, backup: Backup,
                                 result: UploadResult) -> None:
        """After the sha256 was verified on the VM: the marker that lets a later run re-use the
        dump (without it, the dump is never re-used)."""
        index, why = self.load_index(result.size)
        if index is None:
            log.warning("no marker for the staged dump (it will not be re-used): %s", why)
            return
        marker = DumpMarker(backup_id=backup.backup_id, cipher_size=backup.total_size,
                            parts=backup.part_count, plain_size=result.size,
                            plain_sha256=result.sha256, index=index.to_json(),
                            written_by=self.run_id(ctx))
        await write_marker(ops.shell, self.view(ctx).primary, ops.layout, marker)

    async def check_existing_databases(self, ctx: StepContext) -> None:
        """Before anything changes: a dump that does not drop what it creates (pg_dumpall
        without --clean) must not be restored into databases the target holds with objects,
        unless the spec asks to replace them (`cluster.existing_databases`). What was found
        goes into the facts; the databases to replace are pinned for Restoring."""
        index, why = self.load_index(ctx.status.backup.plain_size_bytes)
        if index is None:
            raise FatalError(f"cannot tell which databases the dump restores: {why}",
                             reason="InternalError")
        ops = await self.ops(ctx)
        primary = self.view(ctx).primary
        found = await existing_databases(ops.shell, primary, ops.layout,
                                         [db.name for db in index.databases])
        replace = self.spec.restore.replace_existing_databases
        verdict = decide(index, found, replace=replace)
        facts = {"dumpDropsDatabases": verdict.dump_fact()[:600],
                 "databaseCollisions": verdict.collisions_fact()[:900]}
        if replace:
            facts["databasesToReplace"] = json.dumps(list(verdict.to_replace))[:900]
        await ctx.fact(**facts)
        if verdict.refused:
            raise DatabasesExist(_collision_message(verdict, primary.name, replace=replace))
        if verdict.to_replace:
            text = (f"{', '.join(verdict.to_replace)} will be dropped right before the restore "
                    "(spec.restore.replaceExistingDatabases) and created again by the dump")
        elif verdict.not_dropped:
            text = "the dump does not drop its databases, and none of them holds objects here"
        else:
            text = "the dump drops its databases itself (pg_dumpall --clean)"
        await ctx.update(lambda s: st.set_message(s, f"existing databases checked: {text}"))

    async def databases_replaced(self, ctx: StepContext) -> bool:
        return "databasesReplaced" in ctx.status.facts

    async def replace_existing_databases(self, ctx: StepContext) -> None:
        """Drop the databases pinned in Decrypting (`databasesToReplace`), sessions terminated
        first; the dump creates them again. Idempotent (a dropped one is skipped); the fact is
        made durable before the restore can start, so a resumed run never drops what the
        restore has begun to fill."""
        raw = ctx.status.facts.get("databasesToReplace", "[]")
        names = [str(n) for n in json.loads(raw)]
        ops = await self.ops(ctx)
        dropped = await drop_databases(ops.shell, self.view(ctx).primary, ops.layout, names)
        text = (", ".join(names) + (f" (dropped now: {', '.join(dropped)})"
                                    if dropped != names else "")) if names else "none"
        await ctx.fact(databasesReplaced=text[:900])
        await ctx.checkpoint()
        await ctx.update(lambda s: st.set_message(
            s, f"ensure-databases-replaced: {text}; the restore creates them again"))

    def dump_taps(self) -> list[Tap]:
        """Observers of the whole plain dump while it streams: the section index that the
        parallel restore needs is built here, at no extra pass over the dump."""
        return [_IndexTap(self.index_path())]

    def index_path(self) -> Path:
        return self.work_dir / "dump-index.json"

    def load_index(self, plain_size: int | None) -> tuple[DumpIndex | None, str]:
        """The dump's section index from the work volume, or None with the reason."""
        try:
            index = DumpIndex.from_json(self.index_path().read_text())
        except FileNotFoundError:
            return None, "the dump index is missing (the operator's work volume was reset)"
        except (ValueError, KeyError, TypeError) as exc:
            return None, f"the dump index is unreadable ({exc})"
        if plain_size is not None and index.size != plain_size:
            return None, f"the dump index describes {index.size} bytes, the dump has {plain_size}"
        return index, ""

    async def after_staged(self, ctx: StepContext, result: UploadResult) -> None:
        """Hook after the dump is verified on the primary."""

    # ------------------------------------------------------------------ Staging / Rejoined

    async def note(self, ctx: StepContext, result: StepResult) -> None:
        text = result.message if result.changed else f"unchanged: {result.message}"
        await ctx.update(lambda s: st.set_message(s, f"{result.step}: {text}"))

    def cluster_step(
        self, name: str, op: Callable[[A9sOperations, ClusterView], Awaitable[StepResult]]
    ) -> Step:
        async def apply(ctx: StepContext) -> None:
            ops = await self.ops(ctx)
            result = await op(ops, self.view(ctx))
            await self.note(ctx, result)

        return FunctionStep(name, _never, apply, verify_after=False)

    # ------------------------------------------------------------------ Restoring

    async def apply_bulk_load_settings(self, ctx: StepContext) -> None:
        """Fewer checkpoints while the dump loads (`cluster.bulk_load`): the outcome is the
        fact `bulkLoadSettings`."""
        ops = await self.ops(ctx)
        outcome = await bulk_load.apply(ops.shell, self.view(ctx).primary, ops.layout)
        await ctx.fact(bulkLoadSettings=outcome[:400])

    async def revert_bulk_load_settings(self, ctx: StepContext) -> None:
        ops = await self.ops(ctx)
        if await bulk_load.revert(ops.shell, self.view(ctx).primary, ops.layout):
            await ctx.fact(bulkLoadSettings="reverted")

    async def apply_wal_free_settings(self, ctx: StepContext) -> None:
        """`wal_level = minimal` on the primary for the WAL-free load (`cluster.wal_free`,
        a restart); the outcome is the fact `walFreeLoad`."""
        ops = await self.ops(ctx)
        outcome = await wal_free.apply(ops.shell, self.view(ctx).primary, ops.layout)
        await ctx.fact(walFreeLoad=f"on; settings {outcome}"[:400])

    async def revert_wal_free_settings(self, ctx: StepContext) -> None:
        """In every plan, whether or not this run used the WAL-free load: a marker left by an
        earlier run is put back here too (the re-clone needs wal_level replica)."""
        ops = await self.ops(ctx)
        if await wal_free.revert(ops.shell, self.view(ctx).primary, ops.layout):
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
            ops = await self.ops(ctx)
            try:
                if await bulk_load.revert(ops.shell, self.view(ctx).primary, ops.layout):
                    await ctx.fact(bulkLoadSettings="reverted after the failed restore")
            except Exception as exc:  # noqa: BLE001 - the restore's error is the one to report
                log.warning("could not put back the checkpoint settings after the failed "
                            "restore: %s", exc)
                await ctx.fact(bulkLoadSettings=f"NOT reverted after the failed restore: "
                                                f"{str(exc)[:200]}")
            try:
                if await wal_free.revert(ops.shell, self.view(ctx).primary, ops.layout):
                    await ctx.fact(walFreeSettings="reverted after the failed restore")
            except Exception as exc:  # noqa: BLE001 - the restore's error is the one to report
                log.warning("could not put back wal_level after the failed restore: %s", exc)
                await ctx.fact(walFreeSettings=f"NOT reverted after the failed restore (the "
                                               f"next run does it): {str(exc)[:200]}")
            raise

    async def _restore_dump(self, ctx: StepContext) -> None:
        ops = await self.ops(ctx)
        view = self.view(ctx)
        backup_id = ctx.status.backup.id
        if backup_id is None:
            raise FatalError("no backup pinned in status", reason="InternalError")
        run_id = self.run_id(ctx)
        if not self.spec.restore.wal_free_load and "walFreeLoad" not in ctx.status.facts:
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
        sessions = _sessions_of(mode)
        job_id = parallel_restore_job_id(run_id) if sessions > 1 else ops.restore_job_id(run_id)
        job = await ops.jobs.poll_job(view.primary.endpoint, job_id, tail_bytes=0)
        if job.state is JobState.ABSENT:
            # The dump drops databases, and DROP DATABASE fails ("being accessed by other
            # users") while any session is in one. Sessions were ended in Staging, but local
            # ones may have come back since (pg_hba blocks only remote clients; the WAL-free
            # restart lets the server's own start-up clients in): end them again right before
            # the restore — never once it runs (its own psql sessions are clients too).
            ended = await ops.terminate_client_sessions(view.primary)
            if ended:
                await ctx.fact(sessionsEndedBeforeRestore=str(ended))
        if sessions > 1:
            index, why = self.load_index(ctx.status.backup.plain_size_bytes)
            if index is None:
                raise RestoreFailed(f"the parallel restore was chosen but {why}")
            await start_parallel_restore(
                ops, view, backup_id, run_id, index, sessions,
                wal_free=self.spec.restore.wal_free_load,
                fresh_databases=json.loads(ctx.status.facts.get("databasesToReplace", "[]")))
        else:
            await ops.start_restore(view, backup_id, run_id)
        # Progress from the start (or the re-attach): a restore shorter than one long poll
        # would otherwise show none at all.
        await ctx.progress(0, plain or None, f"restored 0 B of {_human(plain)} (job running)")
        while True:
            ctx.raise_if_cancelled()
            # Long polls: each returns as soon as the restore ends, or after the interval with
            # its progress; so no sleep between them (unless one came back early).
            asked = time.monotonic()
            polled = (
                await poll_parallel_restore(
                    ops, view, backup_id, run_id, wait=RESTORE_POLL_INTERVAL
                )
                if sessions > 1
                else await ops.poll_restore(view, backup_id, run_id, wait=RESTORE_POLL_INTERVAL)
            )
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
                    f"restored {_human(polled.bytes_read)} of "
                    f"{_human(polled.bytes_total or 0)}{tasks}",
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
        wanted = self.spec.parallelism.restore_connections
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

    # ------------------------------------------------------------------ restore proof

    def _proof_sessions(self, ctx: StepContext) -> int:
        """As many count sessions per node as the restore used (at least 2: the counts of two
        tables overlap their reads and their round trips even on one CPU)."""
        return max(2, _sessions_of(ctx.status.facts.get("restoreMode", "")))

    async def _prove(self, ctx: StepContext, node: Node,
                     plan: restore_proof.ProofPlan) -> restore_proof.NodeProof:
        ops = await self.ops(ctx)
        holder = _ProgressHolder()
        done = 0
        total = plan.bytes

        def counted(size: int) -> None:
            nonlocal done
            done += size
            holder.set(done, total or None,
                       f"counted rows of {_human(done)} of {_human(total)} of table data on "
                       f"{node.name}")

        async with _pumping(ctx, holder):
            holder.set(0, total or None, f"counting the rows of {len(plan.tables)} tables on "
                                         f"{node.name}")
            return await restore_proof.prove_node(
                ops.shell, node, ops.layout, plan, sessions=self._proof_sessions(ctx),
                on_counted=counted)

    def _proof_plan(self, ctx: StepContext) -> restore_proof.ProofPlan:
        index, why = self.load_index(ctx.status.backup.plain_size_bytes)
        return restore_proof.plan_proof(index, why)

    async def prove_restore_on_primary(self, ctx: StepContext) -> None:
        """Count every restored table on the primary against the dump's index, before
        anything is done to the standbys (they still hold their old data when this fails).
        The primary's WAL position now is where the standbys must have replayed past."""
        if await _primary_proven(ctx):
            await ctx.update(lambda s: st.set_message(
                s, f"unchanged: {st.proof_summary(s.restore_proof)}"))
            return
        ops = await self.ops(ctx)
        view = self.view(ctx)
        plan = self._proof_plan(ctx)
        lsn = await restore_proof.current_lsn(ops.shell, view.primary, ops.layout)
        proof = await self._prove(ctx, view.primary, plan)
        if not proof.ok:
            raise RestoreIncomplete(
                f"{proof.failure()}. psql reported no error for them. The standbys were not "
                "touched. Look at the dump's COPY block of each table (the staged dump is "
                "kept on the primary; a data line ending in `\\.` ends a COPY early without "
                "an error in PostgreSQL 15) and at anything that wrote to the primary since "
                "the restore")
        result = st.RestoreProof(
            databases=len(plan.databases), tables=proof.tables, rows=proof.rows,
            verified_on=(view.primary.name,), nodes=len(view.all_nodes),
            not_verified=tuple((plan.not_verified + proof.not_verified)
                               [:restore_proof.MAX_NOT_VERIFIED]),
            restore_lsn=lsn, seconds={view.primary.name: proof.seconds},
        )
        await ctx.update(lambda s: st.set_restore_proof(s, result))
        await ctx.fact(restoreProofLsn=lsn)
        summary = st.proof_summary(result)
        await ctx.update(lambda s: st.set_message(s, f"{summary} ({proof.seconds:.1f} s)"))

    async def prove_restore_on_standbys(self, ctx: StepContext) -> None:
        """Each re-cloned standby must have replayed past the end of the restore (and all the
        primary has flushed since: repmgr's registration) and hold the same rows in every
        table; checked on all standbys at once. Once proven it is not counted again: a resumed
        run may come back here after the connections were allowed again."""
        if await _standbys_proven(ctx):
            await ctx.update(lambda s: st.set_message(
                s, f"unchanged: {st.proof_summary(s.restore_proof)}"))
            return
        ops = await self.ops(ctx)
        view = self.view(ctx)
        if "restoreProofLsn" not in ctx.status.facts or ctx.status.restore_proof is None:
            # A recovery that passed Restoring under an operator without this step: the
            # primary is proven now (connections are still blocked), then the standbys.
            await self.prove_restore_on_primary(ctx)
        proof0 = ctx.status.restore_proof
        if "restoreProofLsn" not in ctx.status.facts or proof0 is None:
            raise FatalError("the restore proof of the primary is not in status",
                             reason="InternalError")
        plan = self._proof_plan(ctx)
        lsn = await restore_proof.current_lsn(ops.shell, view.primary, ops.layout)

        async def one(node: Node) -> restore_proof.NodeProof:
            why = await restore_proof.wait_replayed(ops.shell, node, ops.layout, lsn)
            if why is not None:
                raise RestoreIncomplete(
                    f"the restore cannot be proven on {node.name}: {why}. The primary holds "
                    "the restored data")
            return await self._prove(ctx, node, plan)

        proofs = await asyncio.gather(*(one(n) for n in view.standbys), return_exceptions=True)
        errors = [p for p in proofs if isinstance(p, BaseException)]
        if errors:
            raise errors[0]
        done = [p for p in proofs if isinstance(p, restore_proof.NodeProof)]
        bad = [p for p in done if not p.ok]
        if bad:
            raise RestoreIncomplete(
                "; ".join(p.failure() for p in bad) + ". The primary holds the rows the dump "
                "carries: re-clone the standby (a new PgRecovery for this deployment does)")
        verified = (*proof0.verified_on,
                    *(p.node for p in done if p.node not in proof0.verified_on))
        extra = [n for p in done for n in p.not_verified if n not in proof0.not_verified]
        result = proof0.model_copy(update={
            "verified_on": verified, "nodes": len(view.all_nodes),
            "not_verified": (*proof0.not_verified, *extra)[:restore_proof.MAX_NOT_VERIFIED],
            "seconds": {**proof0.seconds, **{p.node: p.seconds for p in done}},
        })
        await ctx.update(lambda s: st.set_restore_proof(s, result))
        await ctx.update(lambda s: st.set_message(s, st.proof_summary(result)))

    async def apply_roles_sql(self, ctx: StepContext) -> None:
        ops = await self.ops(ctx)
        await self.note(ctx, await ops.apply_roles_sql(self.view(ctx), self.run_id(ctx)))

    async def reclone_standbys(self, ctx: StepContext) -> None:
        """Wipe and re-clone every standby, `spec.parallelism.standbyReclones` at a time.

        Each clone is idempotent on its own (a standby already re-cloned in this run and
        streaming is left alone), so a resumed step redoes only the unfinished ones. All clones
        run to their end even when one fails, so status shows every standby's real state; the
        first failure is raised afterwards.
        """
        ops = await self.ops(ctx)
        view = self.view(ctx)
        run_id = self.run_id(ctx)
        bound = asyncio.Semaphore(self.spec.parallelism.standby_reclones)

        async def set_state(node: Node, state: str) -> None:
            await ctx.update(
                lambda s: st.update_node(s, NodeState(name=node.name, role="standby", state=state))
            )

        async def one(node: Node) -> StepResult:
            async with bound:
                ctx.raise_if_cancelled()
                await set_state(node, "recloning")
                try:
                    result = await ops.ensure_standby_recloned(view, node, run_id)
                except BaseException:
                    await set_state(node, "reclone-failed")
                    raise
                await set_state(node, "streaming")
                await self.note(ctx, result)
                return result

        outcomes = await asyncio.gather(
            *(one(node) for node in view.standbys), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        done = [o.message for o in outcomes if isinstance(o, StepResult)]
        await ctx.update(lambda s: st.set_message(s, "; ".join(done) or "no standbys"))

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
        ops = await self.ops(ctx)
        removed = await remove_leftovers(ops.shell, self.nodes, ops.layout,
                                         self.staged_dump_of(ctx.status))
        await ctx.breakpoints.reach("inside-ensure-recovery-files-removed")
        local = await asyncio.to_thread(self._remove_work_files)
        what = [str(r) for r in removed] + local
        await ctx.fact(cleanup=f"done; removed {len(what)}: {'; '.join(what)}"[:900])
        await ctx.update(lambda s: st.set_message(
            s, f"recovery files removed from {len(self.nodes)} node(s) and the work volume"))

    async def observed_nodes(self) -> list[NodeState]:
        """`Plan.observe_nodes`: the nodes as they are after a failure (read-only)."""
        ops = await self._cluster_ops()
        return [_node_state(seen) if isinstance(seen, NodeView)
                else NodeState(name=seen[0].name, state=f"unreachable: {seen[1]}")
                for seen in await ops.observe_nodes()]

    # ------------------------------------------------------------------ leftovers (Plan)

    async def find(self, status: RecoveryStatus) -> list[str]:
        """What this recovery has on the VMs and the work volume now (read-only)."""
        ops = await self._cluster_ops()
        found = await list_leftovers(ops.shell, self.nodes, ops.layout,
                                     self.staged_dump_of(status))
        return [str(f) for f in found] + await asyncio.to_thread(self._work_files)

    async def remove(self, status: RecoveryStatus) -> list[str]:
        """Deletion / `pgrecovery cleanup`: cancel this run's jobs (a restore or a clone still
        running), then remove everything (`cluster.leftovers`, the work files)."""
        ops = await self._cluster_ops()
        if status.backup.id is not None:
            run_id = self.run_id_of(status)
            jobs = [(self.nodes, ops.restore_job_id(run_id)),
                    (self.nodes, parallel_restore_job_id(run_id))]
            jobs += [((node,), ops.clone_job_id(node, run_id)) for node in self.nodes]
            for nodes, job_id in jobs:
                for node in nodes:
                    await ops.jobs.cancel_job(node.endpoint, job_id)
        notes: list[str] = []
        primary = next((n for n in self.nodes if n.name == status.primary), None)
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
        removed = await remove_leftovers(ops.shell, self.nodes, ops.layout,
                                         self.staged_dump_of(status))
        return ([str(r) for r in removed] + await asyncio.to_thread(self._remove_work_files)
                + notes)

    def owned_work_paths(self) -> list[Path]:
        """What this plan writes into the work directory (which, in local mode, may be a
        user's directory holding other things): only these are ever removed."""
        index = self.index_path()
        return [self.parts_dir(), index, index.with_name(index.name + ".tmp")]

    def _work_files(self) -> list[str]:
        return [f"operator:{path} ({_size_of(path)} B)"
                for path in self.owned_work_paths() if path.exists()]

    def _remove_work_files(self) -> list[str]:
        gone = self._work_files()
        for path in self.owned_work_paths():
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        with contextlib.suppress(OSError):
            self.work_dir.rmdir()  # only when empty
        return gone

    async def verify_cluster(self, ctx: StepContext) -> None:
        ops = await self.ops(ctx)
        view = self.view(ctx)
        # Right after the last re-clone repmgr may need a few seconds to see every node.
        for attempt in range(30):
            try:
                health = await ops.verify_cluster(view)
                break
            except NotReadyYet:
                if attempt == 29:
                    raise
                await asyncio.sleep(2)
        states = tuple(
            NodeState(
                name=n.name,
                role="primary" if n == view.primary else "standby",
                state="running" if n == view.primary else "streaming",
            )
            for n in view.all_nodes
        )
        await ctx.update(lambda s: st.set_nodes(s, states))
        await ctx.update(
            lambda s: st.set_message(
                s,
                "cluster verified: "
                + ("healthy" if health.healthy else "; ".join(health.problems)),
            )
        )


async def _never(_ctx: StepContext) -> bool:
    return False


async def _primary_proven(ctx: StepContext) -> bool:
    return "restoreProofLsn" in ctx.status.facts and ctx.status.restore_proof is not None


async def _standbys_proven(ctx: StepContext) -> bool:
    proof = ctx.status.restore_proof
    return proof is not None and proof.nodes > 0 and len(proof.verified_on) == proof.nodes


async def _tools_checked(ctx: StepContext) -> bool:
    """Pinned once: a resumed run keeps the convention the first check found."""
    return "helperConvention" in ctx.status.facts


async def build_a9s_logical_plan(inputs: PlanInputs) -> Plan:
    spec = inputs.spec
    # With target.bosh the nodes come from the director when the cluster is first reached.
    nodes = () if spec.target.bosh is not None else tuple(
        Node(name=n.name, address=n.address, port=ssh.port)
        for node_specs, ssh in [spec.target.require_nodes()] for n in node_specs
    )
    recovery = A9sLogicalRecovery(
        inputs=inputs,
        layout=A9sLayout(postgres_major=spec.target.postgres_major_version),
        nodes=nodes,
    )

    async def backup_pinned(ctx: StepContext) -> bool:
        return ctx.status.backup.id is not None and ctx.status.backup.parts is not None

    async def key_checked(ctx: StepContext) -> bool:
        return "keyDigest" in ctx.status.facts

    async def primary_known(ctx: StepContext) -> bool:
        return ctx.status.primary is not None and "freeBytesOnPrimary" in ctx.status.facts

    r = recovery
    steps: dict[Phase, list[Step]] = {
        Phase.FETCHING: [
            FunctionStep("resolve-backup", backup_pinned, r.resolve_backup),
            FunctionStep(
                "check-encryption-key", key_checked, r.check_encryption_key, verify_after=False
            ),
            FunctionStep("probe-cluster", _never, r.probe_cluster, verify_after=False),
            FunctionStep("check-cluster-tools", _tools_checked, r.check_cluster_tools,
                         verify_after=False),
            FunctionStep("check-free-space", _never, r.check_free_space, verify_after=False),
        ],
        Phase.DECRYPTING: [
            FunctionStep("ensure-restore-dir", r.restore_dir_ready, r.ensure_restore_dir,
                         verify_after=False),
            FunctionStep("stage-dump", r.dump_staged, r.stage_dump),
            FunctionStep("check-existing-databases", _never, r.check_existing_databases,
                         verify_after=False),
        ],
        Phase.STAGING: [
            r.cluster_step("ensure-standbys-stopped", lambda o, v: o.ensure_standbys_stopped(v)),
            r.cluster_step(
                "ensure-repmgr-stopped-on-primary",
                lambda o, v: o.ensure_repmgr_stopped_on_primary(v),
            ),
            r.cluster_step(
                "ensure-inactive-slots-dropped", lambda o, v: o.ensure_inactive_slots_dropped(v)
            ),
            r.cluster_step(
                "ensure-connections-blocked", lambda o, v: o.ensure_connections_blocked(v)
            ),
            r.cluster_step(
                "ensure-startup-locks-clear", lambda o, v: o.ensure_startup_locks_clear(v)
            ),
        ],
        Phase.RESTORING: [
            FunctionStep("ensure-bulk-load-settings", r.restore_done, r.apply_bulk_load_settings,
                         verify_after=False),
            FunctionStep("restore-dump", r.restore_done, r.restore_dump),
        ],
        Phase.REJOINED: [],
    }
    if spec.restore.wal_free_load:
        steps[Phase.RESTORING].insert(1, FunctionStep(
            "ensure-wal-free-settings", r.restore_done, r.apply_wal_free_settings,
            verify_after=False))
    if spec.restore.replace_existing_databases:
        steps[Phase.RESTORING].insert(0, FunctionStep(
            "ensure-databases-replaced", r.databases_replaced, r.replace_existing_databases,
            verify_after=False))
    if spec.target.new_site:
        steps[Phase.RESTORING].append(
            FunctionStep("apply-site-roles", _never, r.apply_roles_sql, verify_after=False)
        )
    # Before Rejoined: the standbys' clones must get the original postgresql.auto.conf.
    steps[Phase.RESTORING].append(
        FunctionStep("ensure-bulk-load-settings-reverted", _never, r.revert_bulk_load_settings,
                     verify_after=False)
    )
    # Always (a marker of an earlier run, whatever this run's spec says): before Rejoined,
    # whose re-clone needs wal_level replica and a WAL sender.
    steps[Phase.RESTORING].append(
        FunctionStep("ensure-wal-free-settings-reverted", _never, r.revert_wal_free_settings,
                     verify_after=False)
    )
    # Last in Restoring: a restore that is not complete fails before the standbys are wiped.
    # Both proof steps check inside apply (as the cluster steps do), so a resumed phase that
    # re-runs the steps before them records them again in plan order.
    steps[Phase.RESTORING].append(
        FunctionStep("prove-restore-on-primary", _never, r.prove_restore_on_primary,
                     verify_after=False)
    )

    def run_id_step(
        name: str, op: Callable[[A9sOperations, ClusterView, str], Awaitable[StepResult]]
    ) -> Step:
        async def apply(ctx: StepContext) -> None:
            ops = await r.ops(ctx)
            await r.note(ctx, await op(ops, r.view(ctx), r.run_id(ctx)))

        return FunctionStep(name, _never, apply, verify_after=False)

    steps[Phase.REJOINED] = [
        run_id_step(
            "ensure-repmgr-schema-truncated",
            lambda o, v, run: o.ensure_repmgr_schema_truncated(v, run),
        ),
        FunctionStep("ensure-primary-registered", _never, r.register_primary,
                     verify_after=False),
        r.cluster_step(
            "ensure-repmgr-running-on-primary", lambda o, v: o.ensure_repmgr_running_on_primary(v)
        ),
        run_id_step("ensure-clone-marker", lambda o, v, run: o.ensure_clone_marker(v, run)),
    ]
    steps[Phase.REJOINED].append(
        FunctionStep("ensure-standbys-recloned", _never, r.reclone_standbys, verify_after=False)
    )
    steps[Phase.REJOINED] += [
        FunctionStep("verify-cluster", _never, r.verify_cluster, verify_after=False),
        # Before the connections are allowed again: nothing but the restore has written yet.
        FunctionStep("prove-restore-on-standbys", _never, r.prove_restore_on_standbys,
                     verify_after=False),
        FunctionStep(
            "ensure-staging-file-removed",
            _never,
            _apply_with(
                r, lambda o, v, ctx: o.ensure_staging_file_removed(v, ctx.status.backup.id or "")
            ),
            verify_after=False,
        ),
        r.cluster_step(
            "ensure-connections-unblocked", lambda o, v: o.ensure_connections_unblocked(v)
        ),
    ]
    steps[Phase.REJOINED] = with_recovery_files_removed(r, steps[Phase.REJOINED])
    return Plan(steps=steps, closers=[recovery.close], leftovers=recovery,
                state_words=STATE_WORDS, observe_nodes=recovery.observed_nodes)


def with_recovery_files_removed(r: A9sLogicalRecovery, rejoined: list[Step]) -> list[Step]:
    """The Rejoined steps, then the cleanup; once it has begun they check as done (their
    resume records are what it removes)."""
    return [
        *(_unless_cleaning(step) for step in rejoined),
        FunctionStep("ensure-recovery-files-removed", _cleaned, r.remove_recovery_files,
                     verify_after=False),
    ]


def _collision_message(verdict: Verdict, primary: str, *, replace: bool) -> str:
    """DatabasesExist: what was found, what to do, and that nothing changed (in that order:
    the message is cut at a length)."""
    held = "; ".join(e.describe() for e in verdict.unreplaceable)
    held = held if len(held) <= 400 else held[:399] + "…"
    kept = (f"Nothing was changed; the verified dump stays staged on {primary} and a new "
            "PgRecovery of the same backup re-uses it")
    if replace:
        return (f"the dump restores into databases it does not create, and on {primary} they "
                f"hold objects: {held}. pgrecovery never drops postgres, template0 or "
                "template1: drop those objects yourself, or restore a dump made with "
                f"pg_dumpall --clean. {kept}")
    return (f"the dump was made without pg_dumpall --clean (it does not drop the databases it "
            f"restores) and on {primary} these already hold objects: {held}. Restored over, "
            "their data would fail on duplicate keys or be there twice. To replace them with "
            "the backup's, create a new PgRecovery with spec.restore.replaceExistingDatabases: "
            "true (each database the dump creates is dropped right before the restore and the "
            f"dump creates it again), or drop or rename them yourself first. {kept}")


def _node_state(seen: NodeView) -> NodeState:
    return NodeState(
        name=seen.node.name,
        role=str(getattr(seen.role, "value", seen.role)),
        monit=" ".join(f"{svc}={state}" for svc, state in sorted(seen.monit.items())),
        state="reachable" if seen.pg_running else "postgres-down",
    )


#: What each destructive step did to the cluster, in words, for the message of a failure after
#: the point of no return (`Plan.state_words`).
STATE_WORDS = {
    "ensure-standbys-stopped": "standbys stopped (monit)",
    "ensure-repmgr-stopped-on-primary": "repmgr stopped on the primary",
    "ensure-inactive-slots-dropped": "inactive replication slots dropped",
    "ensure-connections-blocked": "new connections to the primary refused (pg_hba narrowed; "
                                  "the original kept as pg_hba.conf.pgrecovery-orig)",
    "ensure-startup-locks-clear": "stale startup locks removed",
    "ensure-databases-replaced": "the dump's databases dropped (the restore creates them "
                                 "again)",
    "ensure-bulk-load-settings": "checkpoint settings raised for the restore",
    "restore-dump": "the dump restored into the primary",
    "ensure-bulk-load-settings-reverted": "checkpoint settings back",
    "ensure-wal-free-settings": "the primary restarted with wal_level minimal, no WAL senders, "
                                "archive_mode off (marker wal-free-settings)",
    "ensure-wal-free-settings-reverted": "wal_level, WAL senders and archive_mode back "
                                         "(restarted)",
    "ensure-repmgr-schema-truncated": "repmgr's tables emptied (no node listed until the "
                                      "primary is registered again)",
    "ensure-primary-registered": "the primary registered in repmgr",
    "ensure-repmgr-running-on-primary": "repmgr running on the primary",
    "ensure-clone-marker": "clone marker written on the primary",
    "ensure-standbys-recloned": "standbys wiped, re-cloned and streaming",
    "verify-cluster": "cluster verified",
    "prove-restore-on-primary": "every restored table counted on the primary (read only)",
    "prove-restore-on-standbys": "every restored table counted on the standbys (read only)",
    "ensure-staging-file-removed": "staged dump removed",
    "ensure-connections-unblocked": "connections allowed again",
    "ensure-recovery-files-removed": "recovery files removed",
    # WAL-E point in time (its Restoring steps)
    "ensure-postgres-stopped-on-primary": "PostgreSQL stopped on the primary",
    "ensure-data-dir-replaced": "the primary's data directory replaced (the old one set aside "
                                "or wiped: see facts)",
    "ensure-base-backup-extracted": "base backup extracted",
    "ensure-recovery-configured": "recovery to the point in time configured",
    "ensure-recovery-started": "WAL replay started",
    "wait-for-promotion": "primary promoted at the point in time",
    "ensure-recovery-settings-removed": "recovery settings removed",
}


def _size_of(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


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


def _apply_with(
    r: A9sLogicalRecovery,
    op: Callable[[A9sOperations, ClusterView, StepContext], Awaitable[StepResult]],
) -> Callable[[StepContext], Awaitable[None]]:
    async def apply(ctx: StepContext) -> None:
        ops = await r.ops(ctx)
        await r.note(ctx, await op(ops, r.view(ctx), ctx))

    return apply
