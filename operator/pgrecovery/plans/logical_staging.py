"""Decrypting of a logical recovery: the backup streamed, decrypted and decompressed straight
into the primary's staging directory, its index built on the way, and the target's existing
databases checked against what the dump does to them.

Why this module exists: the staged dump and its index have one owner — this module writes the
index while the dump streams (`_IndexTap`), keeps it beside the dump's marker on the VM (so a
re-used dump brings its index back), and is the only reader (`load_index`) for the restore and
the proof (issue 17: the index used to be saved in one place and read back in two).

Decisions recorded here:
- Fetching only checks; the bytes move here as one pipeline: parts stream from the store (kept
  on the work volume as they pass, for resumes), are decrypted and decompressed, and go straight
  into the primary's staging directory, where the SHA-256 is checked against the stream's. The
  stages overlap, so the phase takes about as long as the slowest of them, not their sum. The
  plain dump never touches the operator's disk.
- A dump an earlier run staged and verified is re-used when its marker and hash match.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pgrecovery import metrics
from pgrecovery.adapters.ssh import UploadResult, shell_script_argv
from pgrecovery.backups.dump_stream import ReplayableDump, StageCounters, Tap
from pgrecovery.backups.listing import Backup
from pgrecovery.backups.progress import human_size
from pgrecovery.cluster.a9s import A9sOperations
from pgrecovery.cluster.dump_index import DumpIndex, DumpIndexer
from pgrecovery.cluster.existing_databases import (
    Verdict,
    decide,
    drop_databases,
    existing_databases,
)
from pgrecovery.cluster.staged_dump import DumpMarker, check_reusable, discard, write_marker
from pgrecovery.engine import status as st
from pgrecovery.engine.steps import StepContext
from pgrecovery.errors import DatabasesExist, FatalError
from pgrecovery.plans.base import ProgressHolder, pumping

if TYPE_CHECKING:
    from pgrecovery.plans.a9s_logical import A9sLogicalRecovery

log = logging.getLogger(__name__)


def index_path(work_dir: Path) -> Path:
    """Where the dump's section index is kept on the operator's work volume."""
    return work_dir / "dump-index.json"


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
class DumpStaging:
    """The Decrypting steps of a logical recovery (`recovery` gives the backup, its key, the
    store and the cluster)."""

    recovery: A9sLogicalRecovery

    async def restore_dir_ready(self, ctx: StepContext) -> bool:
        """The staging directory is there as the runbook makes it (read-only). A real check, so
        a restart later in Decrypting does not run the step again after stage-dump (its record
        would move behind stage-dump's in status.steps)."""
        ops = await self.recovery.ops(ctx)
        script = r"""
d=$1
if [ -d "$d" ] && [ "$(stat -c %U:%G "$d")" = root:vcap ] \
   && [ -n "$(find "$d" -maxdepth 0 -perm -g+w)" ]; then echo ready; else echo missing; fi
"""
        res = await ops.shell.run_root(self.recovery.view(ctx).primary.endpoint,
                                       shell_script_argv(script, ops.layout.restore_dir),
                                       timeout=60)
        return res.stdout.strip() == "ready"

    async def ensure_restore_dir(self, ctx: StepContext) -> None:
        ops = await self.recovery.ops(ctx)
        result = await ops.ensure_restore_dir(self.recovery.view(ctx).primary)
        await self.recovery.note(ctx, result)

    async def dump_staged(self, ctx: StepContext) -> bool:
        """This run staged (or re-used) the dump: its checksum is in status and on the VM, and
        the dump's index is on the work volume (else `stage_dump` takes it from the marker)."""
        backup_id = ctx.status.backup.id
        if backup_id is None or ctx.status.backup.plain_sha256 is None:
            return False
        if self.load_index(ctx.status.backup.plain_size_bytes)[0] is None:
            return False
        ops = await self.recovery.ops(ctx)
        staged = await ops.staged_dump(self.recovery.view(ctx).primary, backup_id)
        return staged is not None and staged.sha256 == ctx.status.backup.plain_sha256

    async def stage_dump(self, ctx: StepContext) -> None:
        """Fetch, decrypt, decompress and upload as one pipeline (overlapped, bounded memory).

        Parts are kept on the work volume as they stream by, so a retry after a dropped store
        or SSH connection fetches only what is missing, and the upload resumes at the byte the
        VM already has (the stream is replayable: decrypting again is local and fast).
        """
        ops = await self.recovery.ops(ctx)
        backup = await self.recovery.backup(ctx)
        view = self.recovery.view(ctx)
        if await self._reuse_staged_dump(ctx, ops, backup):
            return
        holder = ProgressHolder(total=backup.total_size)
        last = {"fetched": 0, "decrypted": 0}

        def on_progress(c: StageCounters) -> None:
            metrics.record_bytes("fetched", max(0, c.fetched - last["fetched"]))
            metrics.record_bytes("decrypted", max(0, c.plain - last["decrypted"]))
            last["fetched"], last["decrypted"] = c.fetched, c.plain
            holder.set(
                c.decrypted,
                c.cipher_total,
                f"fetched {human_size(c.fetched + c.reused)} of {human_size(c.cipher_total)}"
                + (f" ({human_size(c.reused)} kept from an earlier pass)" if c.reused else "")
                + f", decrypted {human_size(c.decrypted)}, dump {human_size(c.plain)}"
                f" → {view.primary.name} {human_size(c.sent)} sent",
            )

        dump = ReplayableDump(
            store=await self.recovery.store(),
            backup=backup,
            parts_dir=self.recovery.parts_dir(),
            key=await self.recovery.encryption_key(),
            digest=self.recovery.digest,
            make_taps=self.dump_taps,
            on_progress=on_progress,
        )
        async with pumping(ctx, holder):
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
        # What the later phases trust (the dump's size and sha256) is durable before the next
        # step: a restart right after it does not hash the dump again to re-use it.
        await ctx.checkpoint()

    async def _reuse_staged_dump(self, ctx: StepContext, ops: A9sOperations,
                                 backup: Backup) -> bool:
        """A dump of this backup that an earlier run staged and verified is used as it is when
        its marker names this backup and the file hashes (on the VM, now) to the marker's
        sha256 (`cluster.staged_dump`); anything else found there is removed and staged again.
        Either way the fact `stagedDumpReuse` says what was decided and why."""
        primary = self.recovery.view(ctx).primary
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
        self.recovery.work_dir.mkdir(parents=True, exist_ok=True)
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
                           f"({human_size(marker.plain_size)})")
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
               f"({human_size(marker.plain_size)}); nothing downloaded or decrypted"))
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
                            written_by=self.recovery.run_id(ctx))
        await write_marker(ops.shell, self.recovery.view(ctx).primary, ops.layout, marker)

    async def check_existing_databases(self, ctx: StepContext) -> None:
        """Before anything changes: a dump that does not drop what it creates (pg_dumpall
        without --clean) must not be restored into databases the target holds with objects,
        unless the spec asks to replace them (`cluster.existing_databases`). What was found
        goes into the facts; the databases to replace are pinned for Restoring."""
        index, why = self.load_index(ctx.status.backup.plain_size_bytes)
        if index is None:
            raise FatalError(f"cannot tell which databases the dump restores: {why}",
                             reason="InternalError")
        ops = await self.recovery.ops(ctx)
        primary = self.recovery.view(ctx).primary
        found = await existing_databases(ops.shell, primary, ops.layout,
                                         [db.name for db in index.databases])
        replace = self.recovery.spec.restore.replace_existing_databases
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
        ops = await self.recovery.ops(ctx)
        primary = self.recovery.view(ctx).primary
        dropped = await drop_databases(ops.shell, primary, ops.layout, names)
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
        return index_path(self.recovery.work_dir)

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
