"""Physical restore of a base backup plus WAL onto the a9s-pg primary, as idempotent steps.

Why this module exists: the WAL-E path replaces the primary's data directory instead of
loading a dump. Everything around it (stopping standbys and repmgr, blocking connections,
re-registering, re-cloning, verifying) is the logical path's and comes from `A9sOperations`;
this module holds only what is physical: PostgreSQL stopped on the primary, the old data
directory set aside or wiped, the base backup unpacked, WAL staged, recovery configured,
replay watched until promotion, the point reached read back, recovery settings removed.

Decisions recorded here:
- Old data directory: renamed to `<data dir>.pgrecovery-old-<run>` (same file system, so the
  rename costs no space) when the store has room for the restored cluster *besides* it; else
  wiped. Which one is decided in Fetching (`space_plan`) from `df` and `du`, and fails there
  with InsufficientSpace when even wiping would not make room. The kept copy is removed only
  after the cluster was verified.
- Configuration: WAL-E leaves postgresql.conf, pg_hba.conf and pg_ident.conf out of the
  partitions; they belong to the deployment (on a9s they include the job's config), so the
  primary's own files are saved before the data directory is touched and put back after
  unpacking, overriding any copy in the backup. postgresql.auto.conf comes from the backup
  when it has one (WAL-E keeps it), else the primary's.
- Recovery settings go into postgresql.auto.conf between marker lines (it is read after
  postgresql.conf wherever that lives) and are removed after promotion; `recovery.signal`
  is created (PostgreSQL removes it when it promotes).
- `restore_command` copies from a WAL directory staged on the primary (`<state dir>/wal/
  <run>`), already decompressed and verified, so the VM needs no lzop and no S3 access.
- Journal files `<state dir>/journal/<run>/<step>` (as in `A9sOperations`) record steps whose
  state cannot be read back (the data directory replaced, each partition unpacked).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from pgrecovery.adapters.ssh import RemoteShell, ReplayableSource, shell_script_argv
from pgrecovery.cluster import monit, psql
from pgrecovery.cluster.a9s import StepResult
from pgrecovery.cluster.journal import journal_has, journal_mark
from pgrecovery.cluster.nodes import (
    A9sLayout,
    Node,
    Progress,
    ProgressEvent,
    no_progress,
    validate_run_id,
)
from pgrecovery.errors import (
    InsufficientSpace,
    NotReadyYet,
    RemoteCommandFailed,
    RestoreFailed,
)

# Room needed on top of the restored files: WAL PostgreSQL writes during replay and after
# promotion until the first checkpoints recycle it, plus file-system slack.
SPACE_MARGIN = 1.10
REPLAY_POLL_INTERVAL = 2.0
# Replay speed on a BOSH disk is >= 20 MB/s of WAL; the floor leaves small restores 30 min.
REPLAY_MIN_TIMEOUT = 1800.0
REPLAY_SECONDS_PER_SEGMENT = 1.0
CONFIG_FILES = ("postgresql.conf", "pg_hba.conf", "pg_ident.conf", "postgresql.auto.conf")
BLOCK_BEGIN = "# pgrecovery: recovery settings (removed after promotion)"
BLOCK_END = "# pgrecovery: end of recovery settings"
PG_LOG = "/var/vcap/sys/log/postgresql-ha/postgresql.log"
"""[U] on real a9s: the job's PostgreSQL log; only read to explain a failed replay."""

# FATAL lines that say nothing about the replay: connections refused while the server starts
# (our own polls) or shuts down, sessions ended by an earlier stop.
_BENIGN_FATAL = re.compile(
    r"not yet accepting connections|the database system is (starting up|shutting down)"
    r"|terminating connection due to administrator command"
)


def replay_fatal_lines(log_tail: str) -> list[str]:
    """The FATAL/PANIC lines of the server's latest start in a log tail (lines before the
    last "starting PostgreSQL" belong to an earlier life of the server)."""
    lines = log_tail.splitlines()
    starts = [i for i, line in enumerate(lines) if "starting PostgreSQL" in line]
    if starts:
        lines = lines[starts[-1]:]
    return [
        line for line in lines
        if ("FATAL" in line or "PANIC" in line) and not _BENIGN_FATAL.search(line)
    ]


Pipe = Callable[[Node, Sequence[str], AsyncIterable[bytes], Callable[[int], None]],
                Awaitable[object]]
"""Stream bytes into a root command on a node (`SshPool.pipe_root`, bound)."""


@dataclass(frozen=True)
class SpacePlan:
    available: int
    old_data: int
    needed: int
    keep_old: bool

    def describe(self) -> str:
        what = "old data directory kept aside" if self.keep_old else \
            "old data directory wiped (no room to keep it)"
        return (f"{self.needed} bytes needed, {self.available} free, old data "
                f"{self.old_data} bytes: {what}")


@dataclass(frozen=True)
class ReplayState:
    in_recovery: bool
    replay_lsn: int | None
    last_xact_time: datetime | None
    timeline: int | None = None


def _lsn(text: str) -> int | None:
    if not text or "/" not in text:
        return None
    hi, _, lo = text.partition("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def _pg_time(text: str) -> datetime | None:
    """`2026-11-21 20:14:41.774935+00` (psql with TimeZone UTC) → aware datetime."""
    if not text:
        return None
    value = datetime.fromisoformat(text.replace(" ", "T"))
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def recovery_block(wal_dir: str, target_time: datetime | None) -> str:
    """The recovery settings appended to postgresql.auto.conf."""
    lines = [
        BLOCK_BEGIN,
        f"restore_command = 'cp {wal_dir}/%f \"%p\"'",
        "recovery_target_timeline = 'latest'",
    ]
    if target_time is not None:
        stamp = target_time.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00")
        lines += [
            f"recovery_target_time = '{stamp}'",
            "recovery_target_inclusive = on",
            "recovery_target_action = 'promote'",
        ]
    lines.append(BLOCK_END)
    return "\n".join(lines) + "\n"


class PhysicalOperations:
    """The physical steps on one primary; names and paths validated, commands quoted."""

    def __init__(
        self,
        shell: RemoteShell,
        pipe: Pipe,
        *,
        layout: A9sLayout | None = None,
        progress: Progress = no_progress,
    ) -> None:
        self.shell = shell
        self.pipe = pipe
        self.layout = layout or A9sLayout()
        self.progress = progress

    def _report(self, step: str, message: str, node: Node, done: int | None = None,
                total: int | None = None) -> None:
        self.progress(ProgressEvent(step, message, node.name, done, total))

    async def _script(self, node: Node, script: str, *args: str, timeout: float = 60,
                      input: str | None = None) -> str:
        res = await self.shell.run_root(node.endpoint, shell_script_argv(script, *args),
                                        timeout=timeout, input=input)
        return res.stdout

    # ------------------------------------------------------------ paths

    def old_data_dir(self, run_id: str) -> str:
        return f"{self.layout.data_dir}.pgrecovery-old-{validate_run_id(run_id)}"

    def wal_dir(self, run_id: str) -> str:
        return f"{self.layout.state_dir}/wal/{validate_run_id(run_id)}"

    def saved_config_dir(self, run_id: str) -> str:
        return f"{self.layout.state_dir}/config/{validate_run_id(run_id)}"

    # ------------------------------------------------------------ Fetching (read-only)

    async def space_plan(self, primary: Node, needed_bytes: int,
                         staged_bytes: int = 0) -> SpacePlan:
        """Decide keep-aside vs wipe; InsufficientSpace when neither leaves enough room.

        `needed_bytes` is everything the restore puts on the store (base backup expanded, the
        staged WAL, segments PostgreSQL restores while replaying); `staged_bytes` (the WAL
        staged in Decrypting) must fit *before* the old data directory can be wiped."""
        script = r"""
df -B1 --output=avail "$1" | tail -n 1
if [ -d "$2" ]; then du -sb -- "$2" | cut -f1; else echo 0; fi
"""
        out = (await self._script(primary, script, self.layout.store_dir,
                                  self.layout.data_dir, timeout=600)).split()
        if len(out) != 2 or not all(x.isdigit() for x in out):
            raise RemoteCommandFailed(f"{primary.name}: unexpected df/du output {out!r}")
        available, old = int(out[0]), int(out[1])
        needed = int(needed_bytes * SPACE_MARGIN)
        plan = SpacePlan(available, old, needed, keep_old=available >= needed)
        staged = int(staged_bytes * SPACE_MARGIN)
        if not plan.keep_old and (available + old < needed or available < staged):
            raise InsufficientSpace(
                f"{primary.name}: {self.layout.store_dir} has {available} bytes free and the "
                f"old data directory holds {old}; the restore needs about {needed} bytes "
                f"(base backup expanded plus WAL), {staged} of them before the old data can "
                "be wiped; grow the persistent disk first"
            )
        self._report("space_plan", plan.describe(), primary)
        return plan

    # ------------------------------------------------------------ Decrypting (not destructive)

    async def staged_wal(self, primary: Node, run_id: str) -> dict[str, int]:
        """WAL files already in the staging directory: name → size."""
        script = r"""
[ -d "$1" ] || exit 0
find "$1" -maxdepth 1 -type f ! -name '*.part' -printf '%f %s\n'
"""
        out = await self._script(primary, script, self.wal_dir(run_id), timeout=120)
        files: dict[str, int] = {}
        for line in out.splitlines():
            name, _, size = line.partition(" ")
            if size.isdigit():
                files[name] = int(size)
        return files

    async def ensure_wal_staged(
        self,
        primary: Node,
        run_id: str,
        files: Sequence[tuple[str, int, Callable[[], AsyncIterable[bytes] | ReplayableSource]]],
        *,
        on_bytes: Callable[[int], None] | None = None,
    ) -> StepResult:
        """Upload (name, plain size, source factory) into the WAL staging directory, owned by
        postgres:vcap 0700; files already there with the right size are not sent again."""
        step = "ensure_wal_staged"
        d = self.wal_dir(run_id)
        await self._script(
            primary,
            'install -d -m 0700 -o postgres -g vcap -- "$(dirname "$1")" "$1"',
            d,
        )
        present = await self.staged_wal(primary, run_id)
        sent = 0
        done_bytes = 0
        for name, size, source in files:
            if not re.fullmatch(r"[0-9A-F]{8}(?:[0-9A-F]{16}|\.history)", name):
                raise ValueError(f"unexpected WAL file name {name!r}")
            if present.get(name) != size:
                await self.shell.upload(primary.endpoint, source(), f"{d}/{name}")
                sent += 1
            done_bytes += size
            if on_bytes is not None:
                on_bytes(done_bytes)
        await self._script(primary, 'chown -R postgres:vcap -- "$1" && chmod 0600 "$1"/*', d)
        self._report(step, f"{len(files)} WAL file(s) staged, {sent} sent", primary)
        return StepResult(step, sent > 0, f"{len(files)} WAL file(s) in {d}")

    # ------------------------------------------------------------ Restoring (destructive)

    async def ensure_postgres_stopped(self, primary: Node) -> StepResult:
        """postgresql-ha and repmgr Not monitored on the primary, no postmaster left."""
        step = "ensure_postgres_stopped"
        changed = await monit.ensure_stopped(
            self.shell, primary, self.layout,
            [self.layout.repmgr_service, self.layout.pg_service],
        )
        await self._assert_no_postmaster(primary)
        self._report(step, "PostgreSQL stopped", primary)
        return StepResult(step, changed, "PostgreSQL stopped on the primary")

    async def _assert_no_postmaster(self, primary: Node) -> None:
        script = r"""
pid=$(head -n 1 "$1/postmaster.pid" 2>/dev/null || true)
if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = postgres ]; then
  echo "a postmaster (pid $pid) still runs on $1" >&2; exit 1
fi
"""
        await self._script(primary, script, self.layout.data_dir)

    async def ensure_data_dir_replaced(self, primary: Node, run_id: str,
                                       keep_old: bool) -> StepResult:
        """Save the primary's config files, then set the old data directory aside (rename) or
        wipe it, and leave an empty postgres:vcap 0700 data directory."""
        step = "ensure_data_dir_replaced"
        if await journal_has(self.shell, primary, self.layout, run_id, step):
            return StepResult(step, False, "data directory already replaced in this run")
        await self._assert_no_postmaster(primary)
        script = r"""
set -e
data=$1 saved=$2 old=$3 keep=$4; shift 4
if [ ! -e "$saved/.complete" ]; then
  rm -rf -- "$saved"; mkdir -p -m 0700 -- "$saved"
  for f in "$@"; do [ -f "$data/$f" ] && cp -p -- "$data/$f" "$saved/$f"; done
  touch "$saved/.complete"
fi
if [ "$keep" = keep ]; then
  if [ -e "$old" ]; then
    # A second attempt after a crash: the old copy is already aside; clear the new one.
    find "$data" -mindepth 1 -delete 2>/dev/null || true
  else
    mv -- "$data" "$old"
  fi
else
  [ -d "$data" ] && find "$data" -mindepth 1 -delete
fi
install -d -m 0700 -o postgres -g vcap -- "$data"
chmod 0700 -- "$data"
"""
        await self._script(primary, script, self.layout.data_dir,
                           self.saved_config_dir(run_id), self.old_data_dir(run_id),
                           "keep" if keep_old else "wipe", *CONFIG_FILES, timeout=1800)
        await journal_mark(self.shell, primary, self.layout, run_id, step)
        what = f"old data kept in {self.old_data_dir(run_id)}" if keep_old else "old data wiped"
        self._report(step, what, primary)
        return StepResult(step, True, what)

    async def ensure_partition_extracted(
        self, primary: Node, run_id: str, index: int, chunks: AsyncIterable[bytes],
        on_bytes: Callable[[int], None],
    ) -> StepResult:
        """`tar -x` one decompressed partition into the data directory as postgres:vcap.
        Re-extracting a partition after a crash overwrites its own files (partitions hold
        disjoint files), so the journal mark comes only after tar succeeded."""
        step = f"partition_{index:08d}_extracted"
        if await journal_has(self.shell, primary, self.layout, run_id, step):
            return StepResult(step, False, f"partition {index} already extracted")
        argv = ["chpst", "-u", "postgres:vcap", "tar", "-x", "-f", "-", "--no-same-owner",
                "--no-same-permissions", "-C", self.layout.data_dir]
        await self.pipe(primary, argv, chunks, on_bytes)
        await journal_mark(self.shell, primary, self.layout, run_id, step)
        return StepResult(step, True, f"partition {index} extracted")

    async def ensure_recovery_configured(
        self, primary: Node, run_id: str, target_time: datetime | None
    ) -> StepResult:
        """Config files back, pg_wal emptied, recovery settings and recovery.signal written."""
        step = "ensure_recovery_configured"
        script = r"""
set -e
data=$1 saved=$2; shift 2
[ -e "$saved/.complete" ] || { echo "saved configuration $saved is missing" >&2; exit 1; }
[ -s "$data/PG_VERSION" ] || { echo "$data holds no base backup (PG_VERSION)" >&2; exit 1; }
[ -f "$data/backup_label" ] || { echo "$data has no backup_label" >&2; exit 1; }
for f in postgresql.conf pg_hba.conf pg_ident.conf; do
  [ -f "$saved/$f" ] && cp -p -- "$saved/$f" "$data/$f"
done
if [ ! -f "$data/postgresql.auto.conf" ] && [ -f "$saved/postgresql.auto.conf" ]; then
  cp -p -- "$saved/postgresql.auto.conf" "$data/postgresql.auto.conf"
fi
touch "$data/postgresql.auto.conf"
sed -i "/^$3\$/,/^$4\$/d" "$data/postgresql.auto.conf"
cat >> "$data/postgresql.auto.conf"
rm -f -- "$data/standby.signal" "$data/postmaster.pid" "$data/postmaster.opts"
mkdir -p "$data/pg_wal/archive_status"
find "$data/pg_wal" -mindepth 1 -maxdepth 1 -type f -delete
touch "$data/recovery.signal"
chown -R postgres:vcap -- "$data"
chmod 0700 -- "$data"
"""
        block = recovery_block(self.wal_dir(run_id), target_time)
        await self._script(primary, script, self.layout.data_dir,
                           self.saved_config_dir(run_id), BLOCK_BEGIN, BLOCK_END, input=block,
                           timeout=600)
        self._report(step, "recovery settings written", primary)
        return StepResult(step, True, block.strip())

    async def ensure_recovery_started(self, primary: Node) -> StepResult:
        """Start postgresql-ha through monit (replay begins); repmgr stays stopped.

        Not waiting for monit's OK: a replay that ends in FATAL (a staged segment gone, the
        target not reached) makes monit restart the server over and over, and the wait would
        only time out minutes later without the reason. `wait_promoted` judges the outcome
        from PostgreSQL and its log."""
        step = "ensure_recovery_started"
        changed = await monit.ensure_started(self.shell, primary, self.layout,
                                             [self.layout.pg_service], wait=False)
        self._report(step, "PostgreSQL started in recovery", primary)
        return StepResult(step, changed, "postgresql-ha started")

    async def replay_state(self, primary: Node) -> ReplayState:
        rows = await psql.query(
            self.shell, primary, self.layout,
            "SET TimeZone = 'UTC'; SELECT pg_is_in_recovery(), "
            "CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() "
            "ELSE pg_current_wal_lsn() END, pg_last_xact_replay_timestamp(), "
            "(SELECT timeline_id FROM pg_control_checkpoint());",
            timeout=60,
        )
        row = rows[-1] if rows else []
        if len(row) < 4:
            raise RemoteCommandFailed(f"{primary.name}: unexpected replay state {rows!r}")
        return ReplayState(row[0] == "t", _lsn(row[1]), _pg_time(row[2]),
                           int(row[3]) if row[3].isdigit() else None)

    async def log_tail(self, primary: Node, lines: int = 40) -> str:
        res = await self.shell.run_root(primary.endpoint, ["tail", "-n", str(lines), PG_LOG],
                                        timeout=30, check=False)
        return res.stdout

    async def wait_promoted(
        self,
        primary: Node,
        *,
        on_state: Callable[[ReplayState], Awaitable[None]],
        timeout: float,
        raise_if_cancelled: Callable[[], None] = lambda: None,
    ) -> ReplayState:
        """Poll until PostgreSQL left recovery (promoted). A server that stopped (FATAL:
        target not reached, missing WAL) fails with the log's last FATAL lines."""
        deadline = time.monotonic() + timeout
        down_since: float | None = None
        while True:
            raise_if_cancelled()
            try:
                state = await self.replay_state(primary)
                down_since = None
            except RemoteCommandFailed as exc:
                if not psql.is_connection_failure(exc):
                    raise
                now = time.monotonic()
                down_since = down_since or now
                fatal = replay_fatal_lines(await self.log_tail(primary, lines=80))
                if fatal and now - down_since > 10:
                    raise RestoreFailed(
                        f"{primary.name}: PostgreSQL stopped during recovery: "
                        + " | ".join(fatal[-3:])[:900]
                    ) from None
                state = None
            if state is not None:
                await on_state(state)
                if not state.in_recovery:
                    return state
            if time.monotonic() > deadline:
                raise NotReadyYet(f"{primary.name}: still in recovery after {timeout:.0f}s")
            await asyncio.sleep(REPLAY_POLL_INTERVAL)

    async def ensure_recovery_settings_removed(self, primary: Node) -> StepResult:
        """Drop the marked block from postgresql.auto.conf and reload."""
        step = "ensure_recovery_settings_removed"
        script = r"""
f=$1/postgresql.auto.conf
[ -f "$f" ] || { echo unchanged; exit 0; }
if grep -qxF -- "$2" "$f"; then
  sed -i "/^$2\$/,/^$3\$/d" "$f"; echo changed
else
  echo unchanged
fi
"""
        out = await self._script(primary, script, self.layout.data_dir, BLOCK_BEGIN, BLOCK_END)
        changed = out.strip() == "changed"
        if changed:
            await psql.execute(self.shell, primary, self.layout, "SELECT pg_reload_conf();")
        return StepResult(step, changed, "recovery settings removed")

    async def ensure_leftovers_removed(self, primary: Node, run_id: str) -> StepResult:
        """WAL staging directory, saved configuration and the old data directory."""
        step = "ensure_leftovers_removed"
        script = r"""
n=0
for d in "$@"; do
  if [ -e "$d" ]; then rm -rf -- "$d"; n=$((n+1)); fi
done
echo "$n"
"""
        out = await self._script(primary, script, self.wal_dir(run_id),
                                 self.saved_config_dir(run_id), self.old_data_dir(run_id),
                                 timeout=1800)
        removed = int(out.strip() or 0)
        return StepResult(step, removed > 0, f"{removed} leftover(s) removed")
