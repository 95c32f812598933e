"""The restore proof: every restored table holds the rows the dump carries, on every node.

Why this module exists: psql finishing without unexpected errors, streaming standbys and a
green monit do not show that the data came back. A COPY block the server ended early (PG 15
takes `\\.` at the END of a data line for the end of the data and silently drops the rows
after it), a task of the parallel restore that never ran, a row removed between the restore
and the rejoin, or a standby cloned from the wrong source all pass those checks. The dump
indexer counts the rows of every COPY block while the dump streams (`dump_index.Entry.rows`),
so after the restore each table is counted with `count(*)` and compared:

- on the primary right after the restore (Restoring), before anything is done to the standbys:
  a difference fails the recovery with `RestoreIncomplete` while the standbys still hold their
  old data;
- on every re-cloned standby (Rejoined), once it has replayed past the primary's WAL position
  at the end of the restore: the same counts, on the node itself. Its hot-standby queries read
  what it replayed, so a standby that stopped replaying (paused, broken stream) cannot pass.
  The position waited for is the primary's flushed WAL when the standbys are checked (later
  than the end of the restore: repmgr's registration came since), so a standby compares like
  with like; a fresh clone is normally there already (its base backup began after it).

Decisions recorded here:
- Exact counts, not `pg_class.reltuples` (an estimate, 0 or -1 before ANALYZE). Measured on the
  1 GB benchmark dump (`bench/e2e.py` prints the proof's share): 2.9-6.3 % of the time to
  Rejoined on a loaded 2-CPU machine, median 4.8 % of 6 runs (README "Performance"). The
  tables are spread over several sessions per node (balanced by their COPY bytes), databases
  side by side; each table is counted by one statement (`query_to_xml` runs the `count(*)` so
  that one round trip counts a whole group of tables, and the table names are resolved by the
  server with `to_regclass` from the dump's own text, never pasted into SQL).
- `count(*) FROM ONLY t`: pg_dump writes each table's own rows, and a plain count of an
  inheritance parent would add its children's. A partitioned table (relkind `p`) holds no rows
  itself; its block only exists with `--load-via-partition-root`, whose rows are in the leaves,
  so it is counted with them.
- What cannot be proven this way is reported as not verified, with the reason, never counted
  as verified: databases the indexer could not place (`fallback`, restored serially), data
  written as INSERT statements (`--inserts`), repmgr's own tables in `repmgr_cluster` (the old
  site's rows collide with the live cluster's by design and the schema is emptied and
  re-registered in Rejoined, `restore_errors`), extension configuration tables whose count
  differs (an extension may insert rows of its own when it is created; an equal count is
  verified like any table), database names psql is not given here, and
  an index written by an older pgrecovery without row counts.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pgrecovery.adapters.ssh import RemoteShell
from pgrecovery.cluster import psql
from pgrecovery.cluster.dump_index import DumpIndex
from pgrecovery.cluster.nodes import A9sLayout, Node
from pgrecovery.cluster.restore_errors import REPMGR_DATABASE, REPMGR_TABLES
from pgrecovery.errors import RemoteCommandFailed

# A count reads every page of the table: a node slower than this many bytes of COPY text per
# second for one group is broken, not slow; the floor leaves small groups ten minutes.
COUNT_BYTES_PER_SECOND = 10e6
COUNT_MIN_TIMEOUT = 600.0
# Sessions per node: the counts are I/O and CPU of the node only, the restore's own session
# count is the measure of what the primary takes (the caller passes it), capped here.
MAX_SESSIONS = 8
# How long a standby may take to replay up to the end of the restore. A fresh clone starts
# after that point (it is a base backup taken later), so this only waits out a standby that is
# still catching up; one whose replay is paused gets `PAUSED_GRACE` to be resumed by a person.
REPLAY_TIMEOUT = 300.0
PAUSED_GRACE = 30.0
REPLAY_POLL = 0.5
# Hot-standby queries can be cancelled by replay ("conflict with recovery"); retried this often.
CONFLICT_RETRIES = 3
# Table differences named in a failure message (all of them are counted).
MAX_NAMED = 10
# Lines of `not verified` kept in status.
MAX_NOT_VERIFIED = 20

_LSN = re.compile(r"^[0-9A-F]{1,8}/[0-9A-F]{1,8}$")


@dataclass(frozen=True)
class Expected:
    """One table the dump loads with COPY: its rows and COPY bytes summed over its blocks."""

    database: str
    table: str
    """As the dump's COPY line names it (SQL text, schema-qualified, quoted where needed)."""
    rows: int
    bytes: int

    @property
    def name(self) -> str:
        return f"{self.database}.{self.table}"


@dataclass
class ProofPlan:
    """What the proof counts, and what it cannot prove (with the reason)."""

    tables: list[Expected] = field(default_factory=list)
    not_verified: list[str] = field(default_factory=list)

    @property
    def databases(self) -> list[str]:
        return sorted({t.database for t in self.tables})

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables)

    @property
    def bytes(self) -> int:
        return sum(t.bytes for t in self.tables)


def plan_proof(index: DumpIndex | None, why_no_index: str = "") -> ProofPlan:
    """The tables to count and their expected rows, from the dump's index."""
    plan = ProofPlan()
    if index is None:
        plan.not_verified.append(f"*: {why_no_index or 'no dump index'}")
        return plan
    if index.fallback:
        plan.not_verified.append(f"*: the dump could not be indexed ({index.fallback})")
        return plan
    for db in index.databases:
        if db.fallback:
            plan.not_verified.append(
                f"{db.name}: restored serially, its rows are not placed by the index "
                f"({db.fallback})")
            continue
        try:
            psql.validate_dbname(db.name)
        except ValueError:
            plan.not_verified.append(f"{db.name}: database name not supported by the proof")
            continue
        sums: dict[str, list[int]] = {}
        inserts = 0
        uncounted = 0
        repmgr_own = 0
        for entry in db.data:
            if entry.type != "TABLE DATA":
                continue
            if entry.copy is None or entry.table is None:
                inserts += 1
                continue
            if entry.rows is None:
                uncounted += 1
                continue
            if db.name == REPMGR_DATABASE and entry.schema == "repmgr" \
                    and entry.name in REPMGR_TABLES:
                repmgr_own += 1
                continue
            try:
                psql.quote_literal(entry.table)
            except ValueError:
                plan.not_verified.append(f"{db.name}.{entry.table!r}: name not supported")
                continue
            acc = sums.setdefault(entry.table, [0, 0])
            acc[0] += entry.rows
            acc[1] += entry.copy[1] - entry.copy[0]
        plan.tables += [Expected(db.name, t, rows, size) for t, (rows, size) in sums.items()]
        if repmgr_own:
            plan.not_verified.append(
                f"{db.name}.repmgr.*: repmgr's own tables (the old site's rows collide with the "
                "live cluster's; the schema is emptied and the primary registered again)")
        if inserts:
            plan.not_verified.append(
                f"{db.name}: {inserts} table(s) dumped as INSERT statements, not counted")
        if uncounted:
            plan.not_verified.append(
                f"{db.name}: {uncounted} table(s) not counted (dump index written by an older "
                "pgrecovery)")
    return plan


@dataclass(frozen=True)
class Found:
    """What a node holds for one expected table."""

    rows: int | None
    """None: the table does not exist."""
    extension: bool = False
    """An extension's member table (its rows may partly be the extension's own)."""


@dataclass(frozen=True)
class Mismatch:
    node: str
    table: Expected
    found: int | None

    def describe(self) -> str:
        got = "the table is missing" if self.found is None else f"found {self.found}"
        return f"{self.table.name}: expected {self.table.rows} rows, {got}"


@dataclass
class NodeProof:
    node: str
    tables: int = 0
    rows: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)
    not_verified: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def failure(self) -> str:
        named = "; ".join(m.describe() for m in self.mismatches[:MAX_NAMED])
        more = len(self.mismatches) - MAX_NAMED
        return (f"{len(self.mismatches)} table(s) on {self.node} do not hold the rows the dump "
                f"carries: {named}" + (f"; and {more} more" if more > 0 else ""))


def compare(node: str, plan: ProofPlan, found: dict[Expected, Found]) -> NodeProof:
    """Every expected table against what the node holds (pure)."""
    proof = NodeProof(node)
    for table in plan.tables:
        seen = found.get(table)
        if seen is None:
            raise KeyError(f"{table.name} was not counted on {node}")
        if seen.rows is not None and seen.extension and seen.rows != table.rows:
            proof.not_verified.append(
                f"{table.name}: extension configuration table, expected {table.rows} rows, "
                f"found {seen.rows} (the extension may add rows of its own)")
            continue
        if seen.rows != table.rows:
            proof.mismatches.append(Mismatch(node, table, seen.rows))
            continue
        proof.tables += 1
        proof.rows += table.rows
    return proof


def _groups(tables: Sequence[Expected], sessions: int) -> list[list[Expected]]:
    """Tables in groups of one database each, balanced by COPY bytes (largest first into the
    lightest group), at most `sessions` groups per database."""
    by_db: dict[str, list[Expected]] = {}
    for t in tables:
        by_db.setdefault(t.database, []).append(t)
    groups: list[list[Expected]] = []
    for members in by_db.values():
        n = max(1, min(sessions, len(members)))
        buckets: list[list[Expected]] = [[] for _ in range(n)]
        loads = [0] * n
        for t in sorted(members, key=lambda t: t.bytes, reverse=True):
            i = loads.index(min(loads))
            buckets[i].append(t)
            loads[i] += t.bytes + 1
        groups += [b for b in buckets if b]
    # The heaviest groups first, so the last to finish is a small one.
    return sorted(groups, key=lambda g: sum(t.bytes for t in g), reverse=True)


def count_sql(tables: Sequence[Expected]) -> str:
    """One statement that counts each table (by its position) and says what it is."""
    values = ", ".join(f"({i}, {psql.quote_literal(t.table)})" for i, t in enumerate(tables))
    return (
        "SELECT t.i, CASE WHEN c.oid IS NULL THEN 'missing' WHEN EXISTS (SELECT 1 FROM "  # noqa: S608 - names as quote_literal()s
        "pg_catalog.pg_depend d WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass "
        "AND d.objid = c.oid AND d.deptype = 'e') THEN 'extension' ELSE 'table' END, "
        "CASE WHEN c.oid IS NULL THEN NULL ELSE (pg_catalog.xpath('/row/c/text()', "
        "pg_catalog.query_to_xml(pg_catalog.format('SELECT count(*) AS c FROM %s %s', "
        "CASE WHEN c.relkind = 'p' THEN '' ELSE 'ONLY' END, c.oid::pg_catalog.regclass), "
        "false, true, '')))[1]::text END "
        f"FROM (VALUES {values}) AS t(i, name) "
        "LEFT JOIN pg_catalog.pg_class c ON c.oid = pg_catalog.to_regclass(t.name) "
        "ORDER BY t.i;\n"
    )


def parse_counts(tables: Sequence[Expected], rows: list[list[str]]) -> dict[Expected, Found]:
    found: dict[Expected, Found] = {}
    for row in rows:
        i, kind, count = int(row[0]), row[1], row[2]
        found[tables[i]] = Found(rows=None if kind == "missing" else int(count),
                                 extension=kind == "extension")
    missing = [t.name for t in tables if t not in found]
    if missing:
        raise RemoteCommandFailed(f"the row count query left out {', '.join(missing[:5])}")
    return found


async def count_rows(
    shell: RemoteShell,
    node: Node,
    layout: A9sLayout,
    plan: ProofPlan,
    *,
    sessions: int,
    on_counted: Callable[[int], None] | None = None,
) -> dict[Expected, Found]:
    """`count(*)` of every table of `plan` on `node`, `sessions` psql sessions at once.
    `on_counted(bytes)` is called as each group finishes (COPY bytes of its tables)."""
    sessions = max(1, min(MAX_SESSIONS, sessions))
    bound = asyncio.Semaphore(sessions)
    found: dict[Expected, Found] = {}

    async def one(group: list[Expected]) -> None:
        size = sum(t.bytes for t in group)
        timeout = max(COUNT_MIN_TIMEOUT, size / COUNT_BYTES_PER_SECOND)
        async with bound:
            for attempt in range(CONFLICT_RETRIES + 1):
                try:
                    rows = await psql.query(shell, node, layout, count_sql(group),
                                            database=group[0].database, timeout=timeout)
                    break
                except RemoteCommandFailed as exc:
                    text = exc.stderr or str(exc)
                    if "conflict with recovery" not in text or attempt == CONFLICT_RETRIES:
                        raise
        found.update(parse_counts(group, rows))
        if on_counted is not None:
            on_counted(size)

    results = await asyncio.gather(*(one(g) for g in _groups(plan.tables, sessions)),
                                   return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise errors[0]
    return found


async def prove_node(
    shell: RemoteShell,
    node: Node,
    layout: A9sLayout,
    plan: ProofPlan,
    *,
    sessions: int,
    on_counted: Callable[[int], None] | None = None,
) -> NodeProof:
    started = time.monotonic()
    found = await count_rows(shell, node, layout, plan, sessions=sessions, on_counted=on_counted)
    proof = compare(node.name, plan, found)
    proof.seconds = round(time.monotonic() - started, 1)
    return proof


# ---------------------------------------------------------------------- WAL positions


async def current_lsn(shell: RemoteShell, node: Node, layout: A9sLayout) -> str:
    """The primary's flushed WAL position (everything committed is before it; only flushed
    WAL is streamed to the standbys, so they can all reach it)."""
    rows = await psql.query(shell, node, layout,
                            "SELECT pg_catalog.pg_current_wal_flush_lsn()::text;", timeout=60)
    lsn = rows[0][0] if rows and rows[0] else ""
    if not _LSN.match(lsn):
        raise RemoteCommandFailed(f"{node.name}: unexpected WAL position {lsn!r}")
    return lsn


@dataclass(frozen=True)
class Replay:
    replayed: str
    reached: bool
    in_recovery: bool
    paused: bool


async def replay_state(shell: RemoteShell, node: Node, layout: A9sLayout, lsn: str) -> Replay:
    if not _LSN.match(lsn):
        raise ValueError(f"not a WAL position: {lsn!r}")
    rows = await psql.query(
        shell, node, layout,
        "SELECT coalesce(pg_catalog.pg_last_wal_replay_lsn()::text, ''), "
        f"coalesce(pg_catalog.pg_last_wal_replay_lsn() >= '{lsn}'::pg_catalog.pg_lsn, false), "
        "pg_catalog.pg_is_in_recovery(), CASE WHEN pg_catalog.pg_is_in_recovery() "
        "THEN pg_catalog.pg_is_wal_replay_paused() ELSE false END;",
        timeout=60,
    )
    replayed, reached, in_recovery, paused = rows[0]
    return Replay(replayed, reached == "t", in_recovery == "t", paused == "t")


async def wait_replayed(
    shell: RemoteShell,
    node: Node,
    layout: A9sLayout,
    lsn: str,
    *,
    timeout: float = REPLAY_TIMEOUT,
    paused_grace: float = PAUSED_GRACE,
) -> str | None:
    """None once `node` has replayed up to `lsn`; else, after the timeout, why not (words)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    paused_since: float | None = None
    while True:
        state = await replay_state(shell, node, layout, lsn)
        if not state.in_recovery:
            return f"{node.name} is not a standby (not in recovery)"
        if state.reached:
            return None
        now = loop.time()
        paused_since = (paused_since or now) if state.paused else None
        if paused_since is not None and now - paused_since >= paused_grace:
            return (f"{node.name} has replayed WAL up to {state.replayed or 'nothing'} only, the "
                    f"restore ended at {lsn}, and its replay is paused "
                    f"(pg_is_wal_replay_paused() for {paused_grace:.0f} s): resume it with "
                    "`SELECT pg_wal_replay_resume()` on that node, or re-clone it")
        if now >= deadline:
            return (f"{node.name} has replayed WAL up to {state.replayed or 'nothing'} only "
                    f"after {timeout:.0f} s, the restore ended at {lsn}"
                    + (" (its replay is paused)" if state.paused else ""))
        await asyncio.sleep(REPLAY_POLL)
