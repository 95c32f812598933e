"""Whether the dump may be restored over the databases the target already holds.

Why this module exists: `pg_dumpall --clean` drops every database before creating it again;
without `--clean` (the runbook never says which) the dump's `CREATE DATABASE` fails with
"already exists" — an expected error — and its tables are then loaded *into the existing
ones*: duplicate keys fail the restore, and tables without a unique key silently hold every row
twice. Found out in Restoring, that is after the point of no return. The dump index sees the
dump's `DROP DATABASE` / `CREATE DATABASE` statements as the dump streams by
(`cluster.dump_index`), so Decrypting decides it before anything changes: a database the dump
fills without dropping it first, that exists on the primary and holds objects (tables, views,
sequences, functions, types), refuses the recovery (`DatabasesExist`), unless the spec asks to
replace them (`spec.restore.replaceExistingDatabases`).

Replacing means what `--clean` would have done: every database the dump creates and does not
drop itself is dropped (sessions terminated first) right before the restore, and the dump's own
`CREATE DATABASE` creates it again with the dump's owner, encoding and locale. Never dropped:
`postgres`, `template0`, `template1` (a dump without `--clean` fills postgres and template1
without creating them; when those hold objects and the dump brings entries for them, the
recovery is refused whatever the spec says). `repmgr_cluster` is restored over by design when
the dump does not drop it: its `repmgr` rows are expected duplicates, and Rejoined empties the
schema and registers the primary again; with the replace option it is replaced like the others
(repmgr is stopped on every node by then, as for a `--clean` dump).

Database names come from the dump: they reach psql only as a conninfo value (`dbname='…'`, one
argv element) or as a quoted identifier / literal in SQL on stdin, never through a shell.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pgrecovery.adapters.ssh import RemoteShell, shell_script_argv
from pgrecovery.cluster import psql
from pgrecovery.cluster.dump_index import DumpIndex
from pgrecovery.cluster.nodes import A9sLayout, Node
from pgrecovery.cluster.restore_errors import REPMGR_DATABASE
from pgrecovery.errors import RemoteCommandFailed

NEVER_DROPPED = frozenset({"postgres", "template0", "template1"})
# Dropping a database waits for its sessions to end; one terminated session that reconnects in
# between (connections are blocked from Staging on, but local superuser sessions are not) is
# tried again a few times.
DROP_ATTEMPTS = 3

_KINDS = {"r": "table", "p": "table", "v": "view", "m": "materialized view",
          "S": "sequence", "f": "foreign table", "function": "function", "type": "type"}

# Objects a user created per database, by kind: relations, functions (procedures, aggregates)
# and types (enums, domains, composite and range types) — not the catalogs', not an
# extension's own, not those PostgreSQL makes for another object (a table's row type, array
# types, a range type's constructors and multirange). A dump without --clean writes each with
# a plain CREATE, so any of them makes the restore fail ("already exists" is expected only for
# roles, databases, schemas, extensions and relations: `restore_errors`).
_OBJECTS_SQL = """\
SELECT current_database(), kind, count(*) FROM (
  SELECT c.relkind::text AS kind
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
    AND n.nspname NOT IN ('pg_catalog', 'information_schema')
    AND n.nspname !~ '^pg_(toast|temp_|toast_temp_)'
    AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                    WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = c.oid
                      AND d.deptype = 'e')
  UNION ALL
  SELECT 'function'
  FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
  WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
    AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                    WHERE d.classid = 'pg_catalog.pg_proc'::regclass AND d.objid = p.oid
                      AND d.deptype IN ('e', 'i'))
  UNION ALL
  SELECT 'type'
  FROM pg_catalog.pg_type t JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
  WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
    AND n.nspname !~ '^pg_(toast|temp_|toast_temp_)'
    AND t.typtype IN ('b', 'c', 'd', 'e', 'r')
    AND (t.typrelid = 0 OR EXISTS (SELECT 1 FROM pg_catalog.pg_class c
                                   WHERE c.oid = t.typrelid AND c.relkind = 'c'))
    AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_type e WHERE e.typarray = t.oid)
    AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                    WHERE d.classid = 'pg_catalog.pg_type'::regclass AND d.objid = t.oid
                      AND d.deptype = 'e')
) AS o
GROUP BY 1, 2;
"""
_COUNT_SCRIPT = r"""
source "$1"; sql=$2; shift 2
for c in "$@"; do
  printf '%s' "$sql" | chpst -u postgres:vcap psql -X --no-password -v ON_ERROR_STOP=1 -q -t \
    --csv -d "$c" || exit $?
done
"""


@dataclass(frozen=True)
class Existing:
    """A database of the dump that the primary already has."""

    name: str
    objects: dict[str, int] = field(default_factory=dict)
    """kind (table, view, sequence, function, type, …) → how many the users created."""
    invalid: bool = False
    """Left invalid by an interrupted DROP DATABASE (PostgreSQL 15.4+ marks it with
    `datconnlimit = -2`): nobody can connect to it, it can only be dropped."""

    @property
    def holds_objects(self) -> bool:
        return any(self.objects.values())

    def describe(self) -> str:
        if self.invalid:
            return (f"{self.name} (invalid: left by an interrupted DROP DATABASE, PostgreSQL "
                    "only allows dropping it)")
        if not self.holds_objects:
            return f"{self.name} (empty)"
        kinds = ", ".join(f"{n} {kind}{'s' if n != 1 else ''}"
                          for kind, n in sorted(self.objects.items()))
        return f"{self.name} ({kinds})"


@dataclass(frozen=True)
class Verdict:
    """What restoring the dump would do to the databases the primary already holds."""

    dropped_by_dump: tuple[str, ...]
    """Databases the dump drops itself before filling them (`--clean`)."""
    not_dropped: tuple[str, ...]
    """Databases the dump fills without dropping them first."""
    collisions: tuple[Existing, ...]
    """Existing databases holding objects that the dump would be restored into."""
    to_replace: tuple[str, ...] = ()
    """With the replace option: the databases pgrecovery drops before the restore."""
    unreplaceable: tuple[Existing, ...] = ()
    """Collisions the replace option cannot resolve (postgres, template1)."""
    restored_over: tuple[str, ...] = ()
    """Existing databases restored over by design (repmgr_cluster)."""

    @property
    def refused(self) -> bool:
        return bool(self.unreplaceable)

    def dump_fact(self) -> str:
        if not self.not_dropped:
            return ("yes (pg_dumpall --clean): the dump drops "
                    f"{', '.join(self.dropped_by_dump) or 'no database'} before restoring")
        return (f"no (pg_dumpall without --clean): {', '.join(self.not_dropped)} restored "
                "without being dropped first")

    def collisions_fact(self) -> str:
        text = "; ".join(e.describe() for e in self.collisions) or "none"
        if self.restored_over:
            text += (f"; restored over by design: {', '.join(self.restored_over)} (repmgr's "
                     "rows are expected duplicates, the schema is emptied in Rejoined)")
        return text


def decide(index: DumpIndex, existing: dict[str, Existing], *, replace: bool) -> Verdict:
    """`existing`: the dump's databases that the primary has (absent = not there)."""
    dropped = tuple(db.name for db in index.databases if db.dropped)
    not_dropped = tuple(db.name for db in index.databases if not db.dropped)
    collisions: list[Existing] = []
    restored_over: list[str] = []
    for db in index.databases:
        found = existing.get(db.name)
        if db.dropped or found is None or db.entries == 0:
            continue
        if found.invalid:
            # The dump's CREATE DATABASE would fail ("already exists") and its \connect
            # then too: the database must be dropped first, which only the option allows.
            collisions.append(found)
        elif db.name == REPMGR_DATABASE:
            restored_over.append(db.name)
        elif found.holds_objects:
            collisions.append(found)
    to_replace: tuple[str, ...] = ()
    if replace:
        to_replace = tuple(db.name for db in index.databases
                           if db.created and not db.dropped and db.name in existing
                           and db.name not in NEVER_DROPPED)
        restored_over = [name for name in restored_over if name not in to_replace]
    unreplaceable = tuple(e for e in collisions if e.name not in to_replace)
    return Verdict(dropped, not_dropped, tuple(collisions), to_replace, unreplaceable,
                   tuple(restored_over))


def conninfo(database: str) -> str:
    """`dbname='…'` for psql's -d (libpq quoting: backslash and quote escaped)."""
    if "\x00" in database:
        raise ValueError("database names cannot hold NUL")
    return "dbname='" + database.replace("\\", "\\\\").replace("'", "\\'") + "'"


async def existing_databases(shell: RemoteShell, node: Node, layout: A9sLayout,
                             names: Sequence[str]) -> dict[str, Existing]:
    """Which of `names` the primary has, with the objects users created in each
    (read-only: two psql sessions' worth of catalog queries). A database left invalid by an
    interrupted DROP DATABASE (a power cut during a `--clean` restore does that) refuses
    connections: it is reported as invalid, never connected to."""
    rows = await psql.query(
        shell, node, layout,
        "SELECT datname, datconnlimit = -2 FROM pg_catalog.pg_database "
        "WHERE datallowconn OR datconnlimit = -2;")
    present = {row[0]: row[1] == "t" for row in rows if len(row) == 2}
    found = {name: Existing(name, invalid=present[name])
             for name in dict.fromkeys(names) if name in present}
    wanted = [name for name, db in found.items() if not db.invalid]
    if not wanted:
        return found
    res = await shell.run_root(
        node.endpoint,
        shell_script_argv(_COUNT_SCRIPT, layout.vars_sh, _OBJECTS_SQL,
                          *(conninfo(name) for name in wanted)),
        timeout=60 + 10 * len(wanted),
    )
    for row in psql.parse_csv(res.stdout):
        if len(row) == 3 and row[0] in found and row[2].isdigit():
            kind = _KINDS.get(row[1], "relation")
            counts = found[row[0]].objects
            counts[kind] = counts.get(kind, 0) + int(row[2])
    return found


async def drop_databases(shell: RemoteShell, node: Node, layout: A9sLayout,
                         names: Sequence[str]) -> list[str]:
    """Terminate each database's sessions and drop it (idempotent: `IF EXISTS`); returns the
    ones that existed. Never one of NEVER_DROPPED."""
    dropped: list[str] = []
    force = " WITH (FORCE)" if layout.postgres_major >= 13 else ""  # FORCE: PostgreSQL 13+
    for name in names:
        if name in NEVER_DROPPED:
            raise ValueError(f"{name} is never dropped")
        literal = psql.quote_literal(name)
        rows = await psql.query(
            shell, node, layout,
            f"SELECT 1 FROM pg_catalog.pg_database WHERE datname = {literal};")  # noqa: S608 - quote_literal
        if not rows:
            continue
        sql = (f"SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity "  # noqa: S608 - quote_literal/quote_ident
               f"WHERE datname = {literal} AND pid <> pg_backend_pid();\n"
               f"DROP DATABASE IF EXISTS {psql.quote_ident(name)}{force};\n")
        for attempt in range(DROP_ATTEMPTS):
            try:
                await psql.execute(shell, node, layout, sql, timeout=600)
                break
            except RemoteCommandFailed as exc:
                if "being accessed by other users" not in (exc.stderr or str(exc)) \
                        or attempt == DROP_ATTEMPTS - 1:
                    raise
        dropped.append(name)
    return dropped
