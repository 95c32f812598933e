"""One POSIX sh script that restores a pg_dumpall dump with several psql sessions at once.

Why this module exists: `psql -f dump` loads one table after another on one connection and
dominates the time to recover. With the byte offsets of `dump_index`, the same dump can be fed
to several psql sessions as byte ranges of the staged file, in an order that gives the same
result as the serial restore:

    phase A (one psql): the globals (roles, …) and every database's CREATE DATABASE part up
        to its `\\connect` line, in dump order, exactly as the serial restore runs them;
    then per database (databases proceed at the same time, within the global bound):
        pre-data (one psql) → COPY blocks and sequence sets (parallel; big tables in row
        slices) → indexes and PK/UNIQUE/EXCLUDE constraints (parallel) → the rest in dump
        order (one psql: FKs, triggers, index attaches, rules, ACLs, comments, matview
        refreshes, …);
    a database the indexer did not fully understand: one psql over its whole section.

Every psql task begins with the database's `\\connect` line and pg_dump preamble (`SET
statement_timeout = 0`, `search_path = ''`, `\\restrict`, …) and, before each entry, the
session settings in effect there (`SET default_tablespace = …`), all as ranges of the dump.
So the script holds only integers and two validated paths, never a name or dump text: it is
injection-safe by construction, whatever the dump contains. Ranges are read with
`dd iflag=skip_bytes,count_bytes` (GNU coreutils, present on BOSH stemcells).

Concurrency is bounded by a FIFO of tokens (GNU make's jobserver idea, POSIX sh only): a task
takes a token before its psql starts and gives it back when psql ends, so at most
`concurrency` psql sessions run in total, across all databases.

Semantics kept from the runbook: no ON_ERROR_STOP (restoring into a live a9s cluster always
prints expected errors, classified afterwards by `restore_errors`); a task psql could not run
(exit status ≠ 0, or a range could not be read) marks the restore failed, and no new task
starts after that. Each task writes its own log `t<id>.log`; when it ends, `<id> <exit>
<bytes> <started> <ended>` is appended to `progress` (a short O_APPEND write is atomic), so the
caller can report bytes done, classify errors per task and database, and see where the time
went.

WAL-free load (`wal_free=True`, while `cluster.wal_free` has the primary at `wal_level =
minimal`): each COPY entry runs in one transaction with a TRUNCATE of its table and `COPY …
WITH (FREEZE)`, so PostgreSQL writes the table without WAL (it syncs the file at commit) and its
rows frozen (no hint-bit writes later). That needs the table's name (TRUNCATE) and an option on
the dump's COPY line, and the script must still hold no dump text. So the SQL around each COPY
goes into a second file, `freeze.sql`, built here only from table names that pass
`_SAFE_TABLE` (schema-qualified, plain or double-quoted ASCII identifiers without backslashes
or control characters), and the script reads ranges of that file exactly as it reads the dump:
a range at or past the dump's size + 1 (so no range can join the two files) is `freeze.sql`'s.
A task then feeds, per table: `BEGIN;` and `TRUNCATE ONLY <table>;` (freeze.sql), the dump's
entry up to its COPY line without the closing `;\\n`, ` WITH (FREEZE);` (freeze.sql), the rows
and `\\.` (dump), `COMMIT;` (freeze.sql). Psql meta-commands cannot help decide at run time:
PostgreSQL 15.18's dumps begin with `\\restrict`, which turns them off.

TRUNCATE must never remove a row the restore did not write, so a table is loaded this way only
when its rows cannot be there before its COPY: its database is dropped before the restore (the
dump's `--clean`, or `replaceExistingDatabases`: `fresh_databases`), its own `CREATE TABLE`
is in that database's pre-data (not an extension's table, which CREATE EXTENSION may have
filled), and the COPY line names the entry's own table (not a partition root). Anything else
loads as before. The prefix before the cut is lexed by psql as before (the indexer found the
line to end `FROM stdin;` outside any quote); a COPY line not ending in `;\\n` (pg_dump never
writes one) could only make that COPY fail. Row slices of one table cannot each TRUNCATE it,
so in this mode a table is one task (`FREEZE_WHOLE_TABLES`, measured in bench/restore.py).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from pgrecovery.cluster.dump_index import DatabaseIndex, DumpIndex, Entry, Range
from pgrecovery.cluster.restore_errors import (
    MAX_UNEXPECTED_KEPT,
    NOTHING_RECREATED,
    ConnectMap,
    Recreated,
    RestoreReport,
    classify_output,
)

_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._/-]+$")
_SAFE_ARG = re.compile(r"^[A-Za-z0-9_./=:,+-]+$")
_IDENT = r'([a-z_][a-z0-9_$]*|"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|"")+")'
_SAFE_TABLE = re.compile(rf"^{_IDENT}\.{_IDENT}$")

# WAL-free mode: a big table loads as one task with FREEZE rather than in row slices without.
FREEZE_WHOLE_TABLES = True
_COPY_TAIL = " WITH (FREEZE);\n"
_COMMIT = "COMMIT;\n"

# Bulk-load session settings, decided here (they hold only while the standbys are stopped,
# which the Staging phase guarantees before Restoring starts):
# * synchronous_commit=off: a crash loses at most the last few commits, and a crash during the
#   restore means restoring again anyway; it also keeps commits from waiting on a synchronous
#   standby that is stopped. Durable from the first checkpoint on (the Rejoined phase's
#   re-clone runs a checkpoint through pg_basebackup).
# * maintenance_work_mem: index builds and FK checks sort in memory. Up to `concurrency`
#   builds run at once, so the VM's memory is divided by concurrency with a margin for
#   shared_buffers and the OS (caller computes it: `maintenance_work_mem_mb`).
# * max_parallel_maintenance_workers is left at the server's setting: the index phase ends
#   with a few big builds on the largest tables, where the serial restore gets parallel
#   workers too; with them off, that tail was the slowest part (measured, bench/restore.py).
#   The server caps all workers together (max_parallel_workers), which bounds oversubscription.
# Nothing here changes what is restored (catalog contents, data), only how fast.
DEFAULT_MAINTENANCE_WORK_MEM_MB = 256
MIN_MAINTENANCE_WORK_MEM_MB = 64
MAX_MAINTENANCE_WORK_MEM_MB = 2048

# More, smaller tasks than sessions balance better when databases and phases share tokens;
# each task costs a psql connection, so not too many.
TASKS_PER_SESSION = 3
MAX_CONCURRENCY = 64


@dataclass(frozen=True)
class Task:
    id: int
    database: str
    """For reports and error classification only; never written into the script."""
    phase: str
    """globals | pre | data | index | post | serial"""
    ranges: tuple[Range, ...]
    bytes: int
    """Bytes of the dump this task accounts for (progress); prefixes are not counted."""


@dataclass(frozen=True)
class RestorePlan:
    script: str
    tasks: tuple[Task, ...]
    total_bytes: int
    concurrency: int
    fallbacks: dict[str, str]
    """database (or "*" for the whole dump) → why it is restored serially."""
    freeze_sql: str = ""
    """`freeze.sql` (WAL-free mode), to be placed in the work directory beside the script."""
    frozen: int = 0
    """COPY entries wrapped for the WAL-free load."""
    recreated: Recreated = NOTHING_RECREATED
    """Databases and roles the dump drops and creates again (`restore_errors.classify`)."""

    def tasks_json(self) -> str:
        """task id → database, phase, bytes, and the recreated databases (stored beside the
        script for the poller, which classifies the errors)."""
        return json.dumps({"total_bytes": self.total_bytes, "fallbacks": self.fallbacks,
                           "recreated": {"databases": sorted(self.recreated.databases),
                                         "roles": sorted(self.recreated.roles)},
                           "tasks": [{k: v for k, v in asdict(t).items() if k != "ranges"}
                                     for t in self.tasks]})


def default_concurrency(nproc_output: str) -> int:
    """Sessions for a primary with `nproc` CPUs: one per CPU, at least 2, at most 16.

    At least 2 because psql (parsing, network) and the backend (COPY, WAL) overlap even on one
    CPU; at most 16 because more sessions mostly add WAL and lock contention.
    """
    text = nproc_output.strip()
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"unexpected nproc output {nproc_output!r}")
    return max(2, min(int(text), 16))


def maintenance_work_mem_mb(meminfo: str, concurrency: int) -> int:
    """maintenance_work_mem per session from /proc/meminfo: a quarter of the memory, shared by
    `concurrency` sessions, clamped to [64 MB, 2 GB]."""
    m = re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.MULTILINE)
    if not m:
        return DEFAULT_MAINTENANCE_WORK_MEM_MB
    mb = int(m.group(1)) // 1024 // 4 // max(1, concurrency)
    return max(MIN_MAINTENANCE_WORK_MEM_MB, min(MAX_MAINTENANCE_WORK_MEM_MB, mb))


def _check_path(path: str, what: str) -> str:
    if not _SAFE_PATH.match(path) or ".." in path.split("/"):
        raise ValueError(f"unsafe {what} {path!r}")
    return path


def _merge(ranges: Sequence[Range]) -> tuple[Range, ...]:
    out: list[Range] = []
    for a, b in ranges:
        if b <= a:
            continue
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return tuple(out)


@dataclass
class _Item:
    """A unit of work for a parallel phase: ranges after the prefix, its state, its cost."""

    ranges: list[Range]
    state: list[Range]
    bytes: int
    cost: int
    pos: int = -1
    """Where the item is in the dump, when its first range is not (WAL-free mode)."""

    @property
    def order(self) -> int:
        return self.pos if self.pos >= 0 else self.ranges[0][0]


def _pack(items: list[_Item], bins: int) -> list[list[_Item]]:
    """Runs of neighbouring items (in dump order) of about equal cost; costliest first.

    Neighbours because a run of adjacent entries is one range, read by one `dd` (a database
    with hundreds of small tables would otherwise start hundreds of processes per phase). An
    item costlier than a run's target is a run of its own. The jobserver starts the runs
    costliest first and hands out sessions as they free up, which balances the rest.
    """
    if not items:
        return []
    target = sum(i.cost for i in items) / max(1, bins)
    runs: list[list[_Item]] = [[]]
    load = 0
    for item in sorted(items, key=lambda i: i.order):
        if runs[-1] and (load + item.cost > target or item.cost > target):
            runs.append([])
            load = 0
        runs[-1].append(item)
        load += item.cost
    return sorted(runs, key=lambda r: -sum(i.cost for i in r))


class _FreezeSql:
    """`freeze.sql`'s text and the ranges of it (offsets from `base`) for each table."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.parts: list[str] = []
        self.size = 0
        self.tables = 0
        self.tail = self._add(_COPY_TAIL)
        self.commit = self._add(_COMMIT)

    def _add(self, text: str) -> Range:
        data = text.encode()
        start = self.base + self.size
        self.parts.append(text)
        self.size += len(data)
        return (start, start + len(data))

    def prologue(self, table: str) -> Range:
        """`table` matched _SAFE_TABLE: a quoted name cannot end its quotes, so this is one
        TRUNCATE of that table whatever the name holds."""
        self.tables += 1
        return self._add(f"BEGIN;\nTRUNCATE ONLY {table};\n")

    def text(self) -> str:
        return "".join(self.parts)


def _unquote(table: str) -> tuple[str, str] | None:
    """(schema, name) of a name that matches _SAFE_TABLE, as pg_dump's header comments show it."""
    m = _SAFE_TABLE.match(table)
    if m is None:
        return None
    a, b = (p[1:-1].replace('""', '"') if p.startswith('"') else p for p in m.groups())
    return (a, b)


def _freezable(e: Entry, db: DatabaseIndex, fresh: bool) -> bool:
    return (fresh and e.type == "TABLE DATA" and e.copy is not None and e.table is not None
            and _unquote(e.table) == (e.schema, e.name) and (e.schema, e.name) in db.tables
            and e.header_end >= e.start + 2 and e.copy[0] == e.header_end)


def _data_items(db: DatabaseIndex, concurrency: int,
                freeze: _FreezeSql | None = None, fresh: bool = False) -> list[_Item]:
    total = sum(e.size for e in db.data)
    target = max(total // max(1, concurrency * TASKS_PER_SESSION), 1)
    items: list[_Item] = []
    for e in db.data:
        if freeze is not None and _freezable(e, db, fresh) and (FREEZE_WHOLE_TABLES or not e.splits
                                                     or e.size <= 2 * target):
            assert e.table is not None  # noqa: S101 - _freezable
            assert e.copy is not None  # noqa: S101 - _freezable
            ranges = [freeze.prologue(e.table), (e.start, e.header_end - 2), freeze.tail,
                      (e.copy[0], e.end), freeze.commit]
            items.append(_Item(ranges, e.state, e.size, e.size, e.start))
            continue
        if e.copy is None or not e.splits or e.size <= 2 * target:
            items.append(_Item([(e.start, e.end)], e.state, e.size, e.size))
            continue
        # Slices of one COPY: its header line, a run of whole rows, the `\.` line. Rows are
        # independent in COPY text format, so the table's contents are the same.
        pieces = min(len(e.splits) + 1, math.ceil(e.size / target))
        step = (len(e.splits) + 1) / pieces
        cuts = [e.splits[min(len(e.splits) - 1, round(step * (k + 1)) - 1)]
                for k in range(pieces - 1)]
        bounds = [e.copy[0], *sorted(set(cuts)), e.copy[1]]
        for k, (a, b) in enumerate(itertools.pairwise(bounds)):
            extra = (e.copy[0] - e.start) + (e.end - e.copy[1]) if k == 0 else 0
            items.append(_Item([(e.start, e.copy[0]), (a, b), (e.copy[1], e.end)], e.state,
                               (b - a) + extra, b - a))
    return items


def _index_items(db: DatabaseIndex) -> list[_Item]:
    table_size: dict[str, int] = {}
    for e in db.data:
        if e.table:
            table_size[e.table] = table_size.get(e.table, 0) + e.size
    return [_Item([(e.start, e.end)], e.state, e.size,
                  table_size.get(e.table or "", 0) + e.size) for e in db.post_parallel]


class _Builder:
    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self.tasks: list[Task] = []

    def task(self, database: str, phase: str, ranges: Sequence[Range], nbytes: int) -> Task:
        t = Task(len(self.tasks), database, phase, _merge(ranges), nbytes)
        self.tasks.append(t)
        return t

    def batch(self, db: DatabaseIndex, phase: str, group: list[_Item]) -> Task:
        ranges: list[Range] = [db.connect, db.preamble]
        last_state: list[Range] | None = None
        for item in group:
            if item.state != last_state:
                ranges += item.state
                last_state = item.state
            ranges += item.ranges
        return self.task(db.name, phase, ranges, sum(i.bytes for i in group))


def build_plan(
    index: DumpIndex,
    dump_path: str,
    work_dir: str,
    *,
    concurrency: int,
    psql_argv: Sequence[str],
    maintenance_work_mem_mb: int = DEFAULT_MAINTENANCE_WORK_MEM_MB,
    wal_free: bool = False,
    fresh_databases: Iterable[str] = (),
) -> RestorePlan:
    """The script and its tasks. `psql_argv` is the command each task pipes its bytes into,
    e.g. `["psql", "-X", "--quiet", "--no-password", "-d", "postgres"]` (every task starts in
    a database that always exists and `\\connect`s from there). `wal_free`: each COPY in one
    transaction with a TRUNCATE and FREEZE (the module's docstring) in the databases the dump
    drops and in `fresh_databases` (dropped before the restore); the plan's `freeze_sql` then
    goes to `<work_dir>/freeze.sql`."""
    _check_path(dump_path, "dump path")
    _check_path(work_dir, "work directory")
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise ValueError(f"concurrency must be 1..{MAX_CONCURRENCY}, not {concurrency}")
    if not psql_argv or not all(_SAFE_ARG.match(a) for a in psql_argv):
        raise ValueError(f"unsafe psql command {list(psql_argv)!r}")
    mwm = max(MIN_MAINTENANCE_WORK_MEM_MB, min(MAX_MAINTENANCE_WORK_MEM_MB,
                                                int(maintenance_work_mem_mb)))
    b = _Builder(concurrency)
    freeze = _FreezeSql(index.size + 1) if wal_free else None
    chains: list[list[tuple[str, list[Task]]]] = []
    fallbacks: dict[str, str] = {}
    if index.fallback:
        fallbacks["*"] = index.fallback
        b.task("postgres", "serial", [(0, index.size)], index.size)
    else:
        phase_a: list[Range] = [index.globals]
        phase_a += [(db.start, db.connect[1]) for db in index.databases]
        b.task("postgres", "globals", phase_a, sum(r[1] - r[0] for r in phase_a))
        for db in index.databases:
            fresh = db.dropped or db.name in set(fresh_databases)
            chains.append(_chain(b, db, concurrency, fallbacks, freeze, fresh=fresh))
    total = sum(t.bytes for t in b.tasks)
    recreated = Recreated(
        frozenset(db.name for db in index.databases if db.dropped and db.created),
        frozenset(index.recreated_roles))
    sql_base = freeze.base if freeze is not None else index.size + 1
    script = _script(b.tasks, chains, dump_path, work_dir, concurrency, psql_argv, mwm,
                     sql_base)
    if freeze is None:
        return RestorePlan(script, tuple(b.tasks), total, concurrency, fallbacks,
                           recreated=recreated)
    return RestorePlan(script, tuple(b.tasks), total, concurrency, fallbacks, freeze.text(),
                       freeze.tables, recreated)


def _chain(b: _Builder, db: DatabaseIndex, concurrency: int, fallbacks: dict[str, str],
           freeze: _FreezeSql | None = None, *,
           fresh: bool = False) -> list[tuple[str, list[Task]]]:
    """The steps of one database: ("one", [task]) runs in the foreground, ("many", tasks) in
    parallel followed by a wait."""
    if db.fallback:
        fallbacks[db.name] = db.fallback
        a, z = db.serial_range
        return [("one", [b.task(db.name, "serial", [(a, z)], z - a)])]
    steps: list[tuple[str, list[Task]]] = []
    pre = b.task(db.name, "pre", [db.connect, db.preamble, db.pre],
                 (db.connect[1] - db.connect[0]) + (db.preamble[1] - db.preamble[0])
                 + (db.pre[1] - db.pre[0]))
    steps.append(("one", [pre]))
    bins = concurrency * TASKS_PER_SESSION
    for phase, items in (("data", _data_items(db, concurrency, freeze, fresh)),
                         ("index", _index_items(db))):
        if items:
            steps.append(("many", [b.batch(db, phase, g) for g in _pack(items, bins)]))
    if db.post_serial:
        ranges = [db.connect, db.preamble, *db.post_serial]
        steps.append(("one", [b.task(db.name, "post", ranges,
                                     sum(r[1] - r[0] for r in db.post_serial))]))
    return steps


_HEAD = """\
#!/bin/sh
# pgrecovery: parallel restore of a pg_dumpall script (generated by restore_script.py).
# Only byte offsets of the dump below: every SQL statement comes from the dump itself.
set -u
D={dump}
W={work}
PGOPTIONS="-c synchronous_commit=off -c maintenance_work_mem={mwm}MB"
export PGOPTIONS
r() {{
  if [ "$1" -ge {sql_base} ]; then f="$W/freeze.sql"; o=$(($1 - {sql_base})); else f=$D; o=$1; fi
  dd if="$f" iflag=skip_bytes,count_bytes skip="$o" count="$2" bs=4M status=none \\
    || : > "$W/t$T.dd-failed"
}}
run() {{
  T=$1
  if [ -e "$W/failed" ]; then return 0; fi
  s=$(date +%s.%N)
  {{ "f$1" 3>&-; }} | {psql} > "$W/t$1.log" 2>&1 3>&-
  rc=$?
  # dd fails too when psql died first (broken pipe): psql's own status says more.
  if [ "$rc" -eq 0 ] && [ -e "$W/t$1.dd-failed" ]; then rc=99; fi
  echo "$1 $rc $2 $s $(date +%s.%N)" >> "$W/progress"
  if [ "$rc" -ne 0 ]; then : > "$W/failed"; fi
}}
get() {{ read -r slot <&3; }}
put() {{ echo >&3; }}
one() {{ get; run "$1" "$2"; put; }}
go() {{ get; {{ run "$1" "$2"; put; }} & }}
ok() {{ [ ! -e "$W/failed" ]; }}
rm -f "$W/slots" "$W/failed"
: > "$W/progress"
mkfifo -m 0600 "$W/slots" || exit 1
exec 3<>"$W/slots"
rm -f "$W/slots"
i=0
while [ "$i" -lt {n} ]; do echo >&3; i=$((i + 1)); done
"""


def _script(tasks: Sequence[Task], chains: Sequence[Sequence[tuple[str, list[Task]]]],
            dump: str, work: str, concurrency: int, psql_argv: Sequence[str], mwm: int,
            sql_base: int) -> str:
    out = [_HEAD.format(dump=shlex.quote(dump), work=shlex.quote(work), mwm=int(mwm),
                        sql_base=int(sql_base),
                        psql=" ".join(shlex.quote(a) for a in psql_argv), n=int(concurrency))]
    for t in tasks:
        body = "; ".join(f"r {int(a)} {int(z - a)}" for a, z in t.ranges)
        out.append(f"f{int(t.id)}() {{ {body}; }}\n")
    for k, chain in enumerate(chains):
        lines = [f"d{k}() {{\n"]
        for i, (how, group) in enumerate(chain):
            if i:
                lines.append("  ok || return 0\n")
            if how == "one":
                lines.append(f"  one {int(group[0].id)} {int(group[0].bytes)}\n")
            else:
                lines += [f"  go {int(t.id)} {int(t.bytes)}\n" for t in group]
                lines.append("  wait\n")
        lines.append("}\n")
        out.append("".join(lines))
    out.append(f"one 0 {int(tasks[0].bytes)}\n")
    if chains:
        # The biggest database first: its chain is the critical path, and the jobserver hands
        # out sessions in the order they are asked for.
        size = [sum(t.bytes for _how, group in chain for t in group) for chain in chains]
        out.append("if ok; then\n")
        out += [f"  d{k} &\n" for k in sorted(range(len(chains)), key=lambda k: -size[k])]
        out.append("  wait\nfi\n")
    out.append("ok || exit 1\nexit 0\n")
    return "".join(out)



@dataclass(frozen=True)
class TaskOutcome:
    exit_code: int
    bytes: int
    seconds: float = 0.0


def parse_progress(text: str) -> dict[int, TaskOutcome]:
    """`<id> <exit> <bytes> <started> <ended>` lines of the progress file (epoch seconds; a
    torn last line is skipped)."""
    done: dict[int, TaskOutcome] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 5 or not all(p.lstrip("-").isdigit() for p in parts[:3]):
            continue
        try:
            seconds = float(parts[4]) - float(parts[3])
        except ValueError:
            continue
        done[int(parts[0])] = TaskOutcome(int(parts[1]), int(parts[2]), seconds)
    return done


def merge_reports(reports: Sequence[RestoreReport]) -> RestoreReport:
    merged = RestoreReport()
    for rep in reports:
        merged.expected.update(rep.expected)
        merged.unexpected_count += rep.unexpected_count
        room = MAX_UNEXPECTED_KEPT - len(merged.unexpected)
        merged.unexpected += rep.unexpected[:max(0, room)]
    return merged


def classify_task_log(task: Task, lines: Iterable[str],
                      recreated: Recreated = NOTHING_RECREATED) -> RestoreReport:
    """Errors of one task's psql output; every message belongs to the task's database.
    `recreated`: the plan's (`RestorePlan.recreated`)."""
    return classify_output(lines, ConnectMap("", initial=task.database, recreated=recreated))
