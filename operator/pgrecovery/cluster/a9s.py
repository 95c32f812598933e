"""The a9s-pg logical-backup runbook as idempotent steps over SSH.

Why this module exists: the runbook (seeds/a9s-pg-manual-logical-backup-recovery.txt) is a
sequence of root commands a person types on three VMs. Each step here ensures one named state,
in the shape `check → apply → check`: the first check makes a second run a no-op (it returns
`StepResult(changed=False)`), the last check proves the apply worked. Steps report progress
through a callback and raise only `pgrecovery.errors`. They never decide *whether* to run
(dry run, confirmation, ordering): that is the engine's job.

How a step knows it already ran, when the state alone cannot tell:

* Restore and re-clone are detached jobs (`adapters.jobs`) with ids derived from the run id,
  so a second start finds the job instead of starting another psql.
* Truncating the repmgr schema is only right once per restore (after the primary registered
  again, the schema holds the new rows): a journal file
  `<state_dir>/journal/<run-id>/<step>` on the primary records it. Same for the roles SQL.
* A re-cloned standby is "fresh" when its data directory holds the clone marker
  `pgrecovery-run-id` with this run's id and the primary reports it streaming. The marker is
  written into the *primary's* data directory after the restore; `repmgr standby clone`
  (pg_basebackup) copies it into every clone, and wiping a standby removes it. A standby that
  was stopped before the restore can never carry it, whatever its system identifier,
  timeline or LSN say (a logical restore changes none of them in a way that is easy to test).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterable, Sequence
from dataclasses import dataclass, field

from pgrecovery.adapters.jobs import JobRunner, JobState, JobStatus
from pgrecovery.adapters.ssh import RemoteShell, ReplayableSource, UploadResult, shell_script_argv
from pgrecovery.cluster import hba, monit, psql, repmgr, staged_dump, tools
from pgrecovery.cluster.journal import journal_has, journal_mark
from pgrecovery.cluster.monit import ServiceState
from pgrecovery.cluster.nodes import (
    A9sLayout,
    ClusterView,
    Node,
    NodeView,
    Progress,
    ProgressEvent,
    Role,
    no_progress,
    validate_backup_id,
    validate_nodes,
    validate_run_id,
)
from pgrecovery.cluster.restore_errors import (
    GREP_PATTERNS,
    ConnectMap,
    RestoreReport,
    classify_output,
)
from pgrecovery.errors import (
    BackupError,
    ClusterError,
    ClusterToolsMismatch,
    FatalError,
    InsufficientSpace,
    NotReadyYet,
    PrimaryAmbiguous,
    RemoteCommandFailed,
    RestoreFailed,
)

log = logging.getLogger(__name__)

# Space estimate (runbook: "enough space to store the backup file and the created database").
# A pg_dumpall script compresses ~4-6x with gzip; the database it creates takes about as
# much as the script (indexes vs. text overhead roughly cancel out), plus WAL written during
# the load until checkpoints recycle it. These are stated guesses, refined once the plain
# size is known (after decrypting).
DUMP_PER_COMPRESSED_BYTE = 5.0
DATABASE_PER_DUMP_BYTE = 1.0
SPACE_MARGIN = 1.10

CLONE_MARKER = "pgrecovery-run-id"
HBA_ORIG_SUFFIX = hba.ORIG_SUFFIX

# Re-cloning copies the whole database; one hour covers tens of GB on BOSH disks. Streaming
# usually starts within seconds of `monit start`.
DEFAULT_CLONE_TIMEOUT = 3600.0
DEFAULT_STREAMING_TIMEOUT = 300.0
JOB_POLL_INTERVAL = 2.0
# Between checks that a re-cloned standby streams (a few SSH round trips each).
STREAMING_POLL_INTERVAL = 0.5


@dataclass(frozen=True)
class StepResult:
    step: str
    changed: bool
    message: str


@dataclass(frozen=True)
class FreeSpace:
    node: str
    available: int
    size: int
    needed: int


@dataclass(frozen=True)
class RestoreStatus:
    job: JobStatus
    done: bool
    report: RestoreReport | None = None
    bytes_read: int | None = None
    bytes_total: int | None = None


@dataclass(frozen=True)
class ClusterHealth:
    healthy: bool
    problems: tuple[str, ...]
    repmgr_rows: tuple[repmgr.RepmgrNode, ...] = field(default=())


def estimate_needed_bytes(
    *, compressed_size: int | None = None, plain_size: int | None = None,
    already_staged: int = 0,
) -> int:
    """Bytes needed free in /var/vcap/store for the dump plus the database it creates."""
    if plain_size is not None:
        dump = float(plain_size)
    elif compressed_size is not None:
        dump = compressed_size * DUMP_PER_COMPRESSED_BYTE
    else:
        raise ValueError("give the compressed or the plain size")
    needed = (dump + dump * DATABASE_PER_DUMP_BYTE) * SPACE_MARGIN - already_staged
    return max(0, int(needed))


def _job_part(text: str) -> str:
    part = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return part if len(part) <= 20 else hashlib.sha256(text.encode()).hexdigest()[:12]


class A9sOperations:
    """The runbook steps for one a9s-pg deployment (its nodes, layout and SSH access)."""

    def __init__(
        self,
        shell: RemoteShell,
        nodes: Sequence[Node],
        *,
        layout: A9sLayout | None = None,
        progress: Progress = no_progress,
        jobs: JobRunner | None = None,
    ) -> None:
        self.shell = shell
        self.nodes = validate_nodes(list(nodes))
        self.layout = layout or A9sLayout()
        self.progress = progress
        self.jobs = jobs or JobRunner(shell, root=self.layout.jobs_root)

    def _report(self, step: str, message: str, node: Node | None = None,
                done: int | None = None, total: int | None = None) -> None:
        self.progress(ProgressEvent(step, message, node.name if node else None, done, total))

    async def _root(self, node: Node, argv: list[str], *, timeout: float = 60,
                    input: str | None = None, check: bool = True) -> str:
        res = await self.shell.run_root(node.endpoint, argv, timeout=timeout, input=input,
                                        check=check)
        return res.stdout

    async def _script(self, node: Node, script: str, *args: str, timeout: float = 60,
                      input: str | None = None) -> str:
        return await self._root(node, shell_script_argv(script, *args), timeout=timeout,
                                input=input)

    async def _query(self, node: Node, sql: str, database: str = psql.MAINTENANCE_DATABASE,
                     timeout: float = psql.DEFAULT_SQL_TIMEOUT) -> list[list[str]]:
        return await psql.query(self.shell, node, self.layout, sql, database=database,
                                timeout=timeout)

    # ============================================================ Fetching

    async def _probe_one(self, node: Node) -> NodeView:
        services = await monit.summary(self.shell, node, self.layout)
        states = {name: s.state.value for name, s in services.items()}
        try:
            rows = await self._query(node, "SELECT pg_is_in_recovery();", timeout=30)
        except RemoteCommandFailed as exc:
            if not psql.is_connection_failure(exc):
                raise
            return NodeView(node, Role.UNKNOWN, pg_running=False, monit=states)
        value = rows[0][0] if rows and rows[0] else ""
        role = {"f": Role.PRIMARY, "t": Role.STANDBY}.get(value, Role.UNKNOWN)
        return NodeView(node, role, pg_running=True, monit=states)

    async def _gather(self, coros: Sequence[object]) -> list[object]:
        results = await asyncio.gather(*coros, return_exceptions=True)  # type: ignore[call-overload]
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            # A fatal error (host key, auth) says more than a retryable one from another node.
            fatal = [e for e in errors if isinstance(e, FatalError)]
            raise (fatal or errors)[0]
        return list(results)

    async def probe_nodes(self, *, check_repmgr: bool = True) -> ClusterView:
        """Reach every node, find exactly one primary, cross-check it with repmgr.

        Read-only. Raises NodeUnreachable / HostKeyMismatch / AuthenticationFailed for a node
        that cannot be reached, PrimaryAmbiguous unless exactly one node is a primary and
        repmgr agrees.
        """
        step = "probe_nodes"
        views: list[NodeView] = []
        for result in await self._gather([self._probe_one(n) for n in self.nodes]):
            if not isinstance(result, NodeView):  # pragma: no cover - _gather raised already
                raise TypeError(result)
            views.append(result)
            self._report(step, f"role {result.role.value}, monit {result.monit}", result.node)
        primaries = [v.node for v in views if v.role is Role.PRIMARY]
        if len(primaries) != 1:
            described = ", ".join(
                f"{v.node.name}={v.role.value}{'' if v.pg_running else ' (PostgreSQL down)'}"
                for v in views
            )
            raise PrimaryAmbiguous(
                f"expected exactly one primary (pg_is_in_recovery() = false), found "
                f"{len(primaries)}: {described}; fix the cluster by hand before recovering"
            )
        primary = primaries[0]
        rows: list[repmgr.RepmgrNode] = []
        if check_repmgr:
            try:
                rows = await repmgr.cluster_show(self.shell, primary, self.layout)
            except RemoteCommandFailed as exc:
                self._accept_without_repmgr(
                    primary, views, f"repmgr unreadable ({str(exc).splitlines()[0][:300]})")
            else:
                if rows:
                    self._check_repmgr_agrees(primary, rows)
                else:
                    # Empty, as a recovery leaves it between truncating repmgr's tables and
                    # registering the primary again (a failure in between).
                    self._accept_without_repmgr(primary, views, "repmgr lists no nodes")
        standbys = tuple(n for n in self.nodes if n != primary)
        return ClusterView(primary, standbys, tuple(views), tuple(rows))

    async def observe_nodes(self) -> list[NodeView | tuple[Node, str]]:
        """Every node's role, PostgreSQL and monit as they are now, deciding nothing (after a
        failure, for the status): a node that cannot be probed comes back with the reason."""
        results = await asyncio.gather(*(self._probe_one(n) for n in self.nodes),
                                       return_exceptions=True)
        return [r if isinstance(r, NodeView) else (n, str(r)[:200] or type(r).__name__)
                for n, r in zip(self.nodes, results, strict=True)]

    def _accept_without_repmgr(self, primary: Node, views: list[NodeView], why: str) -> None:
        """repmgr cannot confirm the primary: its database is gone when an earlier recovery
        was interrupted in Restoring (the `--clean` dump drops it first), its node table is
        empty when one failed between truncating it and registering the primary. Decided: the
        primary is still unambiguous when it is the ONLY running PostgreSQL — the standbys
        stopped, as Staging leaves them — so a new recovery can repair such a cluster; with
        another server running, repmgr's word is needed and its absence is ambiguous."""
        others = [v.node.name for v in views if v.node != primary and v.pg_running]
        if others:
            raise PrimaryAmbiguous(
                f"{primary.name} is the PostgreSQL primary but repmgr cannot confirm it "
                f"({why}) while PostgreSQL runs on {others}; fix repmgr by hand first"
            ) from None
        self._report(
            "probe_nodes",
            f"{why}; the only running PostgreSQL, not in recovery, is taken as the primary "
            "(an earlier recovery stopped half-way?)",
            primary,
        )

    def _check_repmgr_agrees(self, primary: Node, rows: list[repmgr.RepmgrNode]) -> None:
        if not rows:
            raise PrimaryAmbiguous(
                f"repmgr lists no nodes on {primary.name}; cannot confirm the primary"
            )
        row = repmgr.match_row(rows, primary)
        if row is None:
            raise PrimaryAmbiguous(
                f"{primary.name} ({primary.address}) is the PostgreSQL primary but repmgr "
                f"has no node with that address: {[r.conninfo for r in rows]}"
            )
        if row.role != "primary" or row.status != "running":
            raise PrimaryAmbiguous(
                f"{primary.name} is the PostgreSQL primary but repmgr says role "
                f"{row.role!r}, status {row.marker} {row.status!r}"
            )
        others = [r for r in rows if r is not row and r.role == "primary"
                  and r.status.startswith("running")]
        if others:
            raise PrimaryAmbiguous(
                f"repmgr also lists {[r.name for r in others]} as running primaries"
            )

    async def check_cluster_tools(
        self, primary: Node, *, new_site: bool = False
    ) -> tuple[tools.NodeTools, ...]:
        """Every node: the helpers, functions, monit services and programs the destructive
        phases will call are there, and how the helpers expect to be called is determined
        (`cluster.tools`). Read-only. Returns the verdicts, the primary's first; raises
        ClusterToolsMismatch naming node, path and function for any mismatch."""
        step = "check_cluster_tools"
        verdicts: list[tools.NodeTools] = []
        ordered = [primary, *(n for n in self.nodes if n != primary)]
        for result in await self._gather([
            tools.inspect_node(self.shell, n, self.layout, new_site=new_site) for n in ordered
        ]):
            if not isinstance(result, tools.NodeTools):  # pragma: no cover - raised already
                raise TypeError(result)
            verdicts.append(result)
            node = next(n for n in ordered if n.name == result.node)
            self._report(step, "ok: " + (result.convention.value if result.convention
                                         else "undetermined") if result.ok
                         else "; ".join(result.problems), node)
        problems = [p for v in verdicts for p in v.problems]
        if problems:
            raise ClusterToolsMismatch(
                "the cluster's tools differ from what the recovery would call (nothing was "
                "changed): " + "; ".join(problems)
                + ". Fix the job on the named node(s) or describe it (paths, service names), "
                "then create a new recovery"
            )
        return tuple(verdicts)

    async def check_free_space(self, primary: Node, needed_bytes: int) -> FreeSpace:
        """Enough room in the store of the primary? (`df -B1`.) Read-only."""
        out = await self._root(
            primary, ["df", "-B1", "--output=avail,size", self.layout.store_dir], timeout=30
        )
        lines = [ln.split() for ln in out.strip().splitlines()[1:] if ln.strip()]
        if not lines or len(lines[0]) < 2 or not all(x.isdigit() for x in lines[0][:2]):
            raise RemoteCommandFailed(f"{primary.name}: unexpected df output {out!r}")
        avail, size = int(lines[0][0]), int(lines[0][1])
        free = FreeSpace(primary.name, avail, size, needed_bytes)
        self._report("check_free_space", f"{avail} bytes free, {needed_bytes} needed", primary)
        if avail < needed_bytes:
            raise InsufficientSpace(
                f"{primary.name}: {self.layout.store_dir} has {avail} bytes free but the "
                f"restore needs about {needed_bytes} bytes (dump plus restored database); "
                "grow the persistent disk or free space first"
            )
        return free

    # ============================================================ Decrypting

    async def ensure_restore_dir(self, primary: Node) -> StepResult:
        """`/var/vcap/store/postgresql-restore`, owner root, group vcap, g+w (runbook)."""
        step = "ensure_restore_dir"
        script = r"""
d=$1
if [ -d "$d" ] && [ "$(stat -c %U:%G "$d")" = root:vcap ] \
   && [ -n "$(find "$d" -maxdepth 0 -perm -g+w)" ]; then
  echo unchanged; exit 0
fi
mkdir -p "$d" && chown root:vcap "$d" && chmod g+w "$d"
[ "$(stat -c %U:%G "$d")" = root:vcap ] || { echo "ownership not set" >&2; exit 1; }
echo changed
"""
        out = await self._script(primary, script, self.layout.restore_dir)
        changed = out.strip().endswith("changed") and "unchanged" not in out
        self._report(step, "created" if changed else "present", primary)
        return StepResult(step, changed, self.layout.restore_dir)

    async def staged_dump(self, primary: Node, backup_id: str) -> UploadResult | None:
        """The verified dump on the VM from an earlier run, if any (no need to download)."""
        path = self.layout.dump_path(backup_id)
        script = r"""
if [ -f "$1" ] && [ -f "$1.sha256" ]; then stat -c %s -- "$1"; cat -- "$1.sha256"; fi
"""
        out = (await self._script(primary, script, path)).split()
        if len(out) == 2 and out[0].isdigit() and re.fullmatch(r"[0-9a-f]{64}", out[1]):
            return UploadResult(path, int(out[0]), out[1])
        return None

    async def upload_dump(
        self,
        primary: Node,
        stream: AsyncIterable[bytes] | ReplayableSource,
        backup_id: str,
        *,
        total_bytes: int | None = None,
    ) -> UploadResult:
        """Stream the plain dump to `<restore dir>/<backup-id>.dump`, checksum-verified.

        Idempotent: a dump already staged and verified is not sent again (the stream is not
        consumed). The file is root:vcap 0640 — it holds every role's password hash — which
        psql as postgres:vcap can read.
        """
        step = "upload_dump"
        validate_backup_id(backup_id)
        existing = await self.staged_dump(primary, backup_id)
        if existing is not None:
            self._report(step, "already staged and verified", primary, existing.size,
                         existing.size)
            return existing
        path = self.layout.dump_path(backup_id)
        await self._script(
            primary,
            '[ -e "$1" ] || install -m 0640 -o root -g vcap /dev/null "$1"',
            path + ".part",
        )
        last = [0.0]

        def on_bytes(done: int) -> None:
            now = time.monotonic()
            if now - last[0] >= 1.0 or (total_bytes is not None and done >= total_bytes):
                last[0] = now
                self._report(step, "uploading", primary, done, total_bytes)

        try:
            result = await self.shell.upload(primary.endpoint, stream, path, progress=on_bytes)
        except BackupError as exc:
            # The backup itself is bad (corrupt, cut short): the partial file can never be
            # completed by this backup, so it must not stay behind unannounced on the primary.
            await self._script(primary, 'rm -f -- "$1"', path + ".part")
            raise type(exc)(f"{exc}; the partial {path}.part on {primary.name} was removed") \
                from None
        await self._script(
            primary,
            'printf "%s\\n" "$2" > "$1.sha256.tmp" && mv -f "$1.sha256.tmp" "$1.sha256"',
            path,
            result.sha256,
        )
        self._report(step, f"staged, sha256 {result.sha256} verified on the VM", primary,
                     result.size, result.size)
        return result

    # ============================================================ Staging

    async def ensure_standbys_stopped(self, view: ClusterView) -> StepResult:
        """`monit stop postgresql-ha` (and repmgr) on every standby; wait for Not monitored."""
        step = "ensure_standbys_stopped"
        services = [self.layout.pg_service, self.layout.repmgr_service]

        async def one(node: Node) -> bool:
            self._report(step, "stopping postgresql-ha", node)
            changed = await monit.ensure_stopped(self.shell, node, self.layout, services)
            self._report(step, "Not monitored", node)
            return changed

        results = await self._gather([one(n) for n in view.standbys])
        changed = any(bool(r) for r in results)
        return StepResult(step, changed, f"standbys stopped: {[n.name for n in view.standbys]}")

    async def ensure_repmgr_stopped_on_primary(self, view: ClusterView) -> StepResult:
        step = "ensure_repmgr_stopped_on_primary"
        changed = await monit.ensure_stopped(
            self.shell, view.primary, self.layout, [self.layout.repmgr_service]
        )
        self._report(step, "repmgr Not monitored", view.primary)
        return StepResult(step, changed, "repmgr stopped on the primary")

    async def ensure_inactive_slots_dropped(self, view: ClusterView) -> StepResult:
        step = "ensure_inactive_slots_dropped"
        count_sql = "SELECT count(*) FROM pg_replication_slots WHERE NOT active;"
        before = int(self._scalar(await self._query(view.primary, count_sql)))
        if before:
            await psql.execute(
                self.shell, view.primary, self.layout,
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE NOT active;",
            )
        after = int(self._scalar(await self._query(view.primary, count_sql)))
        if after:
            raise NotReadyYet(f"{view.primary.name}: {after} inactive replication slot(s) left")
        self._report(step, f"dropped {before} inactive slot(s)", view.primary)
        return StepResult(step, before > 0, f"{before} inactive slot(s) dropped")

    @staticmethod
    def _scalar(rows: list[list[str]]) -> str:
        if not rows or not rows[0]:
            raise RemoteCommandFailed(f"expected one value from psql, got {rows!r}")
        return rows[0][0]

    async def _resolve(self, primary: Node, address: str) -> list[str]:
        if hba.ip_addresses([address]):
            return [address]
        out = await self._root(primary, ["getent", "ahosts", address], check=False)
        return sorted({ln.split()[0] for ln in out.splitlines() if ln.split()}
                      & set(hba.ip_addresses([ln.split()[0] for ln in out.splitlines()
                                              if ln.split()])))

    async def _hba_file(self, primary: Node) -> str:
        path = self._scalar(await self._query(primary, "SHOW hba_file;"))
        if not path.startswith("/") or ".." in path or not re.fullmatch(r"[A-Za-z0-9._/-]+",
                                                                        path):
            raise RemoteCommandFailed(f"{primary.name}: unexpected hba_file {path!r}")
        return path

    async def ensure_connections_blocked(self, view: ClusterView) -> StepResult:
        """Refuse new connections except local, loopback and the cluster's own nodes, then
        terminate every other client backend (see cluster/hba.py for why pg_hba.conf)."""
        step = "ensure_connections_blocked"
        primary = view.primary
        path = await self._hba_file(primary)
        original = await self._root(primary, ["cat", "--", path])
        changed = False
        if not hba.is_blocked(original):
            allowed: list[str] = []
            for node in self.nodes:
                allowed += await self._resolve(primary, node.address)
            text = hba.blocked_hba(original, allowed, orig_path=path + HBA_ORIG_SUFFIX)
            script = r"""
set -e
hba=$1; orig=$1$2
[ -e "$orig" ] || cp -p -- "$hba" "$orig"
cat > "$hba.pgrecovery-tmp"
chown --reference="$orig" "$hba.pgrecovery-tmp"
chmod --reference="$orig" "$hba.pgrecovery-tmp"
mv -f -- "$hba.pgrecovery-tmp" "$hba"
"""
            await self._script(primary, script, path, HBA_ORIG_SUFFIX, input=text)
            errors = await self._query(
                primary, "SELECT line_number, error FROM pg_hba_file_rules "
                         "WHERE error IS NOT NULL;"
            )
            if errors:
                await self._restore_hba(primary, path)
                raise ClusterError(f"{primary.name}: the blocking pg_hba.conf was rejected "
                                   f"({errors}); the original was put back")
            changed = True
            # The postmaster applies the reload asynchronously: wait until new connections
            # see the new rules, so the terminated clients cannot come back.
            if not await psql.reload_config(self.shell, primary, self.layout):
                raise NotReadyYet(f"{primary.name}: PostgreSQL did not apply the blocking "
                                  "pg_hba.conf within seconds of the reload")
        terminated = await self.terminate_client_sessions(primary)
        self._report(step, f"pg_hba blocks remote clients; {terminated} backend(s) terminated",
                     primary)
        return StepResult(step, changed or terminated > 0,
                          f"blocked ({path}), {terminated} backend(s) terminated")

    async def terminate_client_sessions(self, primary: Node) -> int:
        """End every other client session (a few rounds while some reconnect); how many."""
        terminate = (
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE pid <> pg_backend_pid() AND backend_type = 'client backend';"
        )
        terminated = 0
        for _ in range(5):
            n = int(self._scalar(await self._query(primary, terminate)))
            terminated += n
            if n == 0:
                return terminated
            await asyncio.sleep(0.5)
        raise NotReadyYet(f"{primary.name}: clients keep reconnecting despite the block")

    async def _restore_hba(self, node: Node, path: str) -> bool:
        script = r"""
hba=$1; orig=$1$2
if [ -e "$orig" ]; then mv -f -- "$orig" "$hba"; echo restored; exit 0; fi
if head -n 1 -- "$hba" 2>/dev/null | grep -qF -- "$3"; then
  echo "blocked but $orig is missing" >&2; exit 3
fi
echo unchanged
"""
        out = await self._script(node, script, path, HBA_ORIG_SUFFIX, hba.HEADER)
        return "restored" in out

    async def ensure_startup_locks_clear(self, view: ClusterView,
                                         nodes: Sequence[Node] | None = None) -> StepResult:
        """Remove stale files in /tmp/postgresql-startup-locks/ on the stopped standbys.

        A lock is stale when the PID in it is not alive or is not a PostgreSQL-related
        process (the PID may have been recycled after a reboot); a lock held by a live
        postgres/pg_ctl/pre-start/ctl process is left alone and reported.
        """
        step = "ensure_startup_locks_clear"
        script = r"""
dir=$1
[ -d "$dir" ] || exit 0
for f in "$dir"/* "$dir"/.[!.]*; do
  [ -e "$f" ] || continue
  pid=$(head -c 64 -- "$f" | tr -cd '0-9')
  if [ -n "$pid" ] && [ -r "/proc/$pid/comm" ]; then
    comm=$(cat "/proc/$pid/comm" 2>/dev/null)
    case "$comm" in
      postgres|postmaster|pg_ctl|pg_basebackup|repmgr|repmgrd|pre-start|postgresql-ha*)
        echo "held $f $pid $comm"; continue ;;
    esac
  elif [ -z "$pid" ] && pgrep -x postgres >/dev/null 2>&1; then
    echo "held $f ? postgres-running"; continue
  fi
  rm -f -- "$f" && echo "removed $f"
done
"""
        targets = list(nodes) if nodes is not None else list(view.standbys)
        removed: list[str] = []
        held: list[str] = []
        for node in targets:
            out = await self._script(node, script, self.layout.startup_lock_dir)
            for line in out.splitlines():
                if line.startswith("removed "):
                    removed.append(f"{node.name}:{line[8:]}")
                elif line.startswith("held "):
                    held.append(f"{node.name}:{line[5:]}")
        if held:
            raise NotReadyYet(f"startup locks held by live processes: {held}")
        self._report(step, f"removed {len(removed)} stale lock(s)")
        return StepResult(step, bool(removed), f"removed {removed}" if removed else "clear")

    # ============================================================ Restoring

    def restore_job_id(self, run_id: str) -> str:
        return f"restore-{validate_run_id(run_id)}"

    async def start_restore(self, view: ClusterView, backup_id: str, run_id: str) -> JobStatus:
        """Start `psql --quiet -f <dump> postgres` as postgres:vcap, detached (idempotent).

        `-f` instead of the runbook's `< dump`: same effect, but psql prefixes every message
        with the dump's line number, which `poll_restore` uses to attribute errors to their
        database. Expected errors do not stop psql (no ON_ERROR_STOP), as in the runbook.
        """
        dump = self.layout.dump_path(backup_id)
        job_id = self.restore_job_id(run_id)
        existing = await self.jobs.poll_job(view.primary.endpoint, job_id, tail_bytes=0)
        if existing.state is not JobState.ABSENT:
            return existing
        await self._root(view.primary, ["test", "-f", dump])
        argv = psql.as_postgres_argv(self.layout, ["psql", "-X", "--quiet", "--no-password",
                                                   "-f", dump, "postgres"])
        status = await self.jobs.start_job(view.primary.endpoint, job_id, argv)
        self._report("start_restore", f"restore job {job_id} {status.state.value}",
                     view.primary)
        return status

    async def _restore_position(self, primary: Node, dump: str) -> tuple[int, int] | None:
        script = r"""
dump=$1
size=$(stat -c %s -- "$dump" 2>/dev/null) || exit 0
for p in $(pgrep -x psql); do
  for fd in /proc/$p/fd/*; do
    if [ "$(readlink "$fd" 2>/dev/null)" = "$dump" ]; then
      pos=$(awk '/^pos:/ {print $2}' "/proc/$p/fdinfo/${fd##*/}" 2>/dev/null)
      echo "$pos $size"; exit 0
    fi
  done
done
"""
        out = (await self._script(primary, script, dump)).split()
        if len(out) == 2 and all(x.isdigit() for x in out):
            return int(out[0]), int(out[1])
        return None

    async def poll_restore(
        self, view: ClusterView, backup_id: str, run_id: str, *, wait: float = 0.0
    ) -> RestoreStatus:
        """Running (with bytes of the dump read so far) or done with classified errors.

        `wait`: a long poll, answering as soon as psql ends but after at most `wait` seconds.

        Raises RestoreFailed when psql failed, reported an unexpected error, or the job was
        lost (the VM restarted mid-restore: the database holds a partial restore).
        """
        step = "poll_restore"
        dump = self.layout.dump_path(backup_id)
        job_id = self.restore_job_id(run_id)
        status = await self.jobs.poll_job(view.primary.endpoint, job_id, wait=wait)
        if status.state is JobState.ABSENT:
            raise RestoreFailed(f"{view.primary.name}: no restore job {job_id}; start it first")
        if status.state in (JobState.RUNNING, JobState.STARTING):
            pos = await self._restore_position(view.primary, dump)
            done, total = pos if pos else (None, None)
            self._report(step, "psql is loading the dump", view.primary, done, total)
            return RestoreStatus(status, False, bytes_read=done, bytes_total=total)
        if status.state is JobState.LOST:
            raise RestoreFailed(
                f"{view.primary.name}: the restore job {job_id} vanished without an exit code "
                "(VM restarted?); the database may hold a partial restore. Last output: "
                + status.log_tail[-500:]
            )
        patterns = [arg for p in GREP_PATTERNS for arg in ("-e", p)]
        grep = await self._root(view.primary, ["grep", "-n", *patterns, "--", dump],
                                check=False, timeout=1800)
        report = await self._classify(view.primary, job_id, ConnectMap(grep))
        if status.exit_code != 0 or status.cancelled:
            raise RestoreFailed(
                f"{view.primary.name}: psql exited {status.exit_code}"
                f"{' (cancelled)' if status.cancelled else ''}; {report.summary()}; last "
                f"output: {status.log_tail[-500:]}"
            )
        if not report.ok:
            raise RestoreFailed(f"{view.primary.name}: the restore reported errors that are not "
                                f"on the expected list: {report.summary()}")
        self._report(step, f"restore finished; {report.summary()}", view.primary)
        return RestoreStatus(status, True, report)

    async def _classify(self, primary: Node, job_id: str, connects: ConnectMap) -> RestoreReport:
        lines: list[str] = []
        async for line in self.jobs.log_lines(primary.endpoint, job_id):
            lines.append(line)
        return classify_output(lines, connects)

    async def apply_roles_sql(self, view: ClusterView, run_id: str) -> StepResult:
        """New site only: create_or_update_roles_and_databases.sql, once per run."""
        step = "apply_roles_sql"
        if await journal_has(self.shell, view.primary, self.layout, run_id, step):
            return StepResult(step, False, "already applied in this run")
        argv = psql.as_postgres_argv(self.layout, [
            "psql", "-X", "-q", "--no-password", "-v", "ON_ERROR_STOP=1",
            "-f", self.layout.roles_sql, "-d", "postgres"])
        await self._root(view.primary, argv, timeout=600)
        await journal_mark(self.shell, view.primary, self.layout, run_id, step)
        self._report(step, "roles and databases updated", view.primary)
        return StepResult(step, True, "roles SQL applied")

    # ============================================================ Rejoined

    _COUNT_REPMGR_ROWS = """
SELECT coalesce(sum((xpath('/row/c/text()',
         query_to_xml(format('SELECT count(*) AS c FROM repmgr.%I', tablename),
                      false, true, '')))[1]::text::bigint), 0)
FROM pg_tables WHERE schemaname = 'repmgr';
"""
    _TRUNCATE_REPMGR = """
DO $$ DECLARE
r record;
BEGIN
FOR r IN (SELECT tablename FROM pg_tables WHERE schemaname = 'repmgr') LOOP
EXECUTE 'TRUNCATE repmgr.' || quote_ident(r.tablename) || ' CASCADE';
END LOOP;
END $$;
"""

    async def ensure_repmgr_schema_truncated(self, view: ClusterView, run_id: str) -> StepResult:
        """Empty every table of schema `repmgr` in `repmgr_cluster` (the runbook's DO block),
        once per run: afterwards the schema holds the new registration, not old rows."""
        step = "ensure_repmgr_schema_truncated"
        if await journal_has(self.shell, view.primary, self.layout, run_id, step):
            return StepResult(step, False, "already truncated in this run")
        await psql.execute(self.shell, view.primary, self.layout, self._TRUNCATE_REPMGR,
                           database="repmgr_cluster")
        left = int(self._scalar(await self._query(view.primary, self._COUNT_REPMGR_ROWS,
                                                  database="repmgr_cluster")))
        if left:
            raise RemoteCommandFailed(f"{view.primary.name}: {left} repmgr row(s) left after "
                                      "TRUNCATE")
        await journal_mark(self.shell, view.primary, self.layout, run_id, step)
        self._report(step, "repmgr schema truncated", view.primary)
        return StepResult(step, True, "repmgr tables emptied")

    async def _primary_registered(self, view: ClusterView) -> bool:
        rows = await repmgr.cluster_show(self.shell, view.primary, self.layout)
        row = repmgr.match_row(rows, view.primary)
        return row is not None and row.role == "primary" and row.status == "running"

    async def ensure_primary_registered(
        self,
        view: ClusterView,
        convention: tools.Convention | None = None,
        repmgr_config: str | None = None,
    ) -> StepResult:
        """`register_master_node` from repmgr_utils.sh, called the way the job's helpers
        expect (`convention`, as found in Fetching: as postgres, as root, or — no such
        helper — the standard `repmgr primary register --force -f <config>`). Without a
        convention it is determined on the primary now."""
        step = "ensure_primary_registered"
        if await self._primary_registered(view):
            return StepResult(step, False, "primary already registered")
        if convention is None:
            found = await tools.inspect_node(self.shell, view.primary, self.layout)
            if found.convention is None:
                raise ClusterToolsMismatch("; ".join(found.problems) or found.evidence)
            convention, repmgr_config = found.convention, found.repmgr_config
        how = tools.describe(convention, repmgr_config or self.layout.repmgr_config)
        await self._root(view.primary,
                         tools.register_primary_argv(self.layout, convention, repmgr_config),
                         timeout=120)
        if not await self._primary_registered(view):
            raise RemoteCommandFailed(f"{view.primary.name}: {how} ran but repmgr does not "
                                      "show the node as a running primary")
        self._report(step, f"registered as repmgr primary ({how})", view.primary)
        return StepResult(step, True, f"primary registered: {how}")

    async def ensure_repmgr_running_on_primary(self, view: ClusterView) -> StepResult:
        step = "ensure_repmgr_running_on_primary"
        changed = await monit.ensure_started(self.shell, view.primary, self.layout,
                                             [self.layout.repmgr_service])
        self._report(step, "repmgr running", view.primary)
        return StepResult(step, changed, "repmgr running on the primary")

    async def _primary_data_dir(self, primary: Node) -> str:
        path = self._scalar(await self._query(primary, "SHOW data_directory;"))
        if not re.fullmatch(r"/[A-Za-z0-9._/-]+", path) or ".." in path:
            raise RemoteCommandFailed(f"{primary.name}: unexpected data_directory {path!r}")
        return path

    async def ensure_clone_marker(self, view: ClusterView, run_id: str) -> StepResult:
        """Write `<data dir>/pgrecovery-run-id` = run id on the primary (copied into clones)."""
        step = "ensure_clone_marker"
        validate_run_id(run_id)
        data_dir = await self._primary_data_dir(view.primary)
        script = r"""
f=$1/$2
if [ "$(cat -- "$f" 2>/dev/null)" = "$3" ]; then echo unchanged; exit 0; fi
printf '%s\n' "$3" > "$f.tmp" && chown postgres:vcap "$f.tmp" && chmod 0600 "$f.tmp" \
  && mv -f -- "$f.tmp" "$f"
echo changed
"""
        out = await self._script(view.primary, script, data_dir, CLONE_MARKER, run_id)
        return StepResult(step, out.strip() == "changed", f"{data_dir}/{CLONE_MARKER}")

    async def _streaming_clients(self, primary: Node) -> set[str]:
        rows = await self._query(
            primary,
            "SELECT host(client_addr) FROM pg_stat_replication WHERE state = 'streaming';",
        )
        return {r[0] for r in rows if r and r[0]}

    async def _standby_addresses(self, standby: Node) -> set[str]:
        return set(await self._resolve(standby, standby.address))

    async def _marker_on(self, node: Node) -> str:
        path = f"{self.layout.data_dir}/{CLONE_MARKER}"
        res = await self.shell.run_root(node.endpoint, ["cat", "--", path], timeout=30,
                                        check=False)
        return res.stdout.strip() if res.exit_status == 0 else ""

    async def standby_is_fresh(self, view: ClusterView, standby: Node, run_id: str) -> bool:
        """Cloned in this run (marker) and streaming from the current primary, monit OK."""
        if await self._marker_on(standby) != run_id:
            return False
        services = await monit.summary(self.shell, standby, self.layout)
        for name in (self.layout.pg_service, self.layout.repmgr_service):
            found = monit.find_service(services, name)
            if found is None or found.state is not ServiceState.RUNNING:
                return False
        streaming = await self._streaming_clients(view.primary)
        return bool(streaming & await self._standby_addresses(standby))

    def clone_job_id(self, standby: Node, run_id: str) -> str:
        return f"clone-{_job_part(standby.name)}-{validate_run_id(run_id)}"

    async def ensure_standby_recloned(
        self,
        view: ClusterView,
        standby: Node,
        run_id: str,
        *,
        clone_timeout: float = DEFAULT_CLONE_TIMEOUT,
        streaming_timeout: float = DEFAULT_STREAMING_TIMEOUT,
    ) -> StepResult:
        """Wipe the standby's data directory, run `pre-start` (clones from the primary), start
        postgresql-ha and repmgr, wait until it streams. A standby already re-cloned in this
        run and streaming is left alone."""
        step = "ensure_standby_recloned"
        if standby == view.primary or standby not in view.standbys:
            raise ClusterError(f"refusing to re-clone {standby.name}: it is not a standby")
        await self.ensure_clone_marker(view, run_id)
        if await self.standby_is_fresh(view, standby, run_id):
            return StepResult(step, False, f"{standby.name} already re-cloned and streaming")
        # Never wipe a standby unless the primary is up and really the primary.
        rows = await self._query(view.primary, "SELECT pg_is_in_recovery();")
        if self._scalar(rows) != "f":
            raise PrimaryAmbiguous(f"{view.primary.name} is no longer a primary; not wiping "
                                   f"{standby.name}")
        job_id = self.clone_job_id(standby, run_id)
        status = await self.jobs.poll_job(standby.endpoint, job_id, tail_bytes=0)
        clone_done = status.succeeded and await self._marker_on(standby) == run_id
        if status.state in (JobState.RUNNING, JobState.STARTING):
            self._report(step, "clone already running", standby)
        elif not clone_done:
            if status.state is not JobState.ABSENT:
                await self.jobs.remove_job(standby.endpoint, job_id)
            services = [self.layout.pg_service, self.layout.repmgr_service]
            self._report(step, "stopping postgresql-ha", standby)
            await monit.ensure_stopped(self.shell, standby, self.layout, services)
            await self.ensure_startup_locks_clear(view, [standby])
            script = r"""
d=$1
if [ -f "$d/postmaster.pid" ] && pgrep -x postgres >/dev/null 2>&1 \
   && kill -0 "$(head -n1 "$d/postmaster.pid")" 2>/dev/null; then
  echo "PostgreSQL still runs on $d" >&2; exit 1
fi
find "$d" -mindepth 1 -delete
"""
            self._report(step, f"wiping {self.layout.data_dir}", standby)
            await self._script(standby, script, self.layout.data_dir, timeout=1800)
            await self.jobs.start_job(standby.endpoint, job_id, [self.layout.pre_start])
            self._report(step, "pre-start (clone) started", standby)
        status = await self._wait_job(standby, job_id, clone_timeout, step)
        if not status.succeeded:
            raise RemoteCommandFailed(
                f"{standby.name}: pre-start exited {status.exit_code} "
                f"({status.state.value}); last output: {status.log_tail[-600:]}",
                exit_status=status.exit_code,
            )
        self._report(step, "clone done; starting postgresql-ha and repmgr", standby)
        await monit.ensure_started(self.shell, standby, self.layout,
                                   [self.layout.pg_service, self.layout.repmgr_service])
        deadline = time.monotonic() + streaming_timeout
        while not await self.standby_is_fresh(view, standby, run_id):
            if time.monotonic() >= deadline:
                raise NotReadyYet(f"{standby.name}: re-cloned but not streaming from "
                                  f"{view.primary.name} after {streaming_timeout:.0f}s")
            await asyncio.sleep(STREAMING_POLL_INTERVAL)
        self._report(step, "streaming from the primary", standby)
        return StepResult(step, True, f"{standby.name} re-cloned and streaming")

    async def _wait_job(self, node: Node, job_id: str, timeout: float, step: str) -> JobStatus:
        deadline = time.monotonic() + timeout
        while True:
            asked = time.monotonic()
            status = await self.jobs.poll_job(node.endpoint, job_id, tail_bytes=300,
                                              wait=JOB_POLL_INTERVAL)
            if status.state not in (JobState.RUNNING, JobState.STARTING):
                return status
            if time.monotonic() >= deadline:
                raise NotReadyYet(f"{node.name}: job {job_id} still running after "
                                  f"{timeout:.0f}s")
            last = status.log_tail.strip().splitlines()[-1:] or [""]
            self._report(step, f"running: {last[0][:200]}", node)
            # The poll waited remotely; sleep only if it came back early (still running).
            await asyncio.sleep(max(0.0, JOB_POLL_INTERVAL - (time.monotonic() - asked)))

    async def cluster_health(self, view: ClusterView) -> ClusterHealth:
        problems: list[str] = []
        probed = await self.probe_nodes(check_repmgr=False)
        if probed.primary != view.primary:
            problems.append(f"primary moved to {probed.primary.name}")
        for v in probed.nodes:
            if v.node in view.standbys and v.role is not Role.STANDBY:
                problems.append(f"{v.node.name} is {v.role.value}, not a standby")
            for service in (self.layout.pg_service, self.layout.repmgr_service):
                state = v.monit.get(service)
                if state != ServiceState.RUNNING.value:
                    problems.append(f"{v.node.name}: monit {service} is {state}")
        streaming = await self._streaming_clients(view.primary)
        for standby in view.standbys:
            if not streaming & await self._standby_addresses(standby):
                problems.append(f"{standby.name} is not streaming from {view.primary.name}")
        rows = await repmgr.cluster_show(self.shell, view.primary, self.layout)
        for node in self.nodes:
            row = repmgr.match_row(rows, node)
            want = "primary" if node == view.primary else "standby"
            if row is None:
                problems.append(f"repmgr does not list {node.name}")
            elif row.role != want or row.status != "running" or row.marker not in ("*", ""):
                problems.append(f"repmgr: {node.name} is {row.role} {row.marker} {row.status}")
        return ClusterHealth(not problems, tuple(problems), tuple(rows))

    async def verify_cluster(self, view: ClusterView) -> ClusterHealth:
        """One primary, every standby streaming from it, repmgr and monit all running."""
        health = await self.cluster_health(view)
        if not health.healthy:
            raise NotReadyYet("cluster not healthy yet: " + "; ".join(health.problems))
        self._report("verify_cluster", "healthy: one primary, standbys streaming")
        return health

    async def ensure_staging_file_removed(self, view: ClusterView, backup_id: str) -> StepResult:
        """Remove the staged dump (and its marker, checksum and partial files) from the
        primary."""
        step = "ensure_staging_file_removed"
        path = self.layout.dump_path(backup_id)
        script = r"""
dir=$1; shift
n=0
for f in "$@"; do
  if [ -e "$f" ]; then rm -f -- "$f"; n=$((n+1)); fi
done
rmdir -- "$dir" 2>/dev/null || true
echo "$n"
"""
        out = await self._script(view.primary, script, self.layout.restore_dir,
                                 *staged_dump.staged_files(self.layout, backup_id))
        removed = int(out.strip() or 0)
        self._report(step, f"removed {removed} file(s)", view.primary)
        return StepResult(step, removed > 0, f"{path} removed")

    async def ensure_connections_unblocked(self, view: ClusterView) -> StepResult:
        """Put the original pg_hba.conf back on every node that has the blocked one (clones
        copy it when hba_file lives in the data directory) and reload."""
        step = "ensure_connections_unblocked"
        changed_nodes: list[str] = []
        for node in view.all_nodes:
            path = await self._hba_path_on(node)
            if path is None:
                continue
            if await self._restore_hba(node, path):
                changed_nodes.append(node.name)
                try:
                    await psql.execute(self.shell, node, self.layout, "SELECT pg_reload_conf();")
                except RemoteCommandFailed as exc:
                    if not psql.is_connection_failure(exc):
                        raise
        self._report(step, f"original pg_hba.conf restored on {changed_nodes}")
        return StepResult(step, bool(changed_nodes), f"unblocked on {changed_nodes}")

    async def _hba_path_on(self, node: Node) -> str | None:
        try:
            return await self._hba_file(node)
        except RemoteCommandFailed as exc:
            if not psql.is_connection_failure(exc):
                raise
        # PostgreSQL down: the default location in the data directory.
        return f"{self.layout.data_dir}/pg_hba.conf"

