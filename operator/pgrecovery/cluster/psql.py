"""psql on an a9s-pg VM, exactly as the runbook runs it, with SQL on stdin.

Why this module exists: the runbook's way to reach PostgreSQL is
`source /var/vcap/jobs/postgresql-ha/helpers/vars.sh; chpst -u postgres:vcap psql …` as root:
vars.sh sets the environment (PATH to the PostgreSQL binaries, port, PGPASSFILE, …) and chpst
drops to postgres:vcap for peer authentication over the local socket, so no password is ever
needed or passed. The SQL text goes to psql's stdin, never to `-c` on a command line (it could
hold a password in `create_or_update…` style statements, and stdin needs no shell quoting).

Everything a caller can influence is validated: database names match a conservative pattern
and become one argv element; identifiers and literals inside SQL go through `quote_ident` /
`quote_literal` (E'' literals, so the result does not depend on standard_conforming_strings).
"""

from __future__ import annotations

import asyncio
import csv
import io
import re

from pgrecovery.adapters.ssh import CommandResult, RemoteShell, shell_script_argv
from pgrecovery.cluster.nodes import A9sLayout, Node
from pgrecovery.errors import RemoteCommandFailed

_DBNAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

# vars.sh first (it may set PATH to the versioned binaries), then drop to postgres:vcap.
# `exec` so that `timeout` (see adapters.ssh) signals psql itself.
_AS_POSTGRES = r"""
source "$1"; shift
exec chpst -u postgres:vcap "$@"
"""

DEFAULT_SQL_TIMEOUT = 120.0

# Cluster-wide statements (catalog reads, ALTER SYSTEM, pg_terminate_backend, DROP DATABASE…)
# run in `postgres`, as the runbook's psql does. A `--clean` dump drops and creates `postgres`
# itself (`DROP DATABASE postgres;` then `CREATE DATABASE postgres`), so a restore cut in
# between leaves a server without it; every psql then failed with "database "postgres" does
# not exist" and a new run took the server for down. Such statements then run in template1
# (a plain `template1` connection, never dropped by pgrecovery), and the restore creates
# `postgres` again before it starts (`ensure_maintenance_database`).
MAINTENANCE_DATABASE = "postgres"
FALLBACK_DATABASE = "template1"


def validate_dbname(name: str) -> str:
    if not _DBNAME.match(name):
        raise ValueError(f"unsafe database name {name!r}")
    return name


def quote_ident(name: str) -> str:
    """A PostgreSQL identifier, always double-quoted (`"` doubled)."""
    if not name or _CONTROL.search(name):
        raise ValueError(f"unsafe identifier {name!r}")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """A PostgreSQL string literal as E'…' (`\\` and `'` escaped; no control characters)."""
    if _CONTROL.search(value):
        raise ValueError("control characters are not allowed in SQL literals")
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def as_postgres_argv(layout: A9sLayout, argv: list[str]) -> list[str]:
    """`source vars.sh; exec chpst -u postgres:vcap <argv>` as a root argv."""
    return shell_script_argv(_AS_POSTGRES, layout.vars_sh, *argv)


def psql_argv(
    layout: A9sLayout, database: str, *extra: str, on_error_stop: bool = True
) -> list[str]:
    args = ["psql", "-X", "--no-password"]
    if on_error_stop:
        args += ["-v", "ON_ERROR_STOP=1"]
    args += [*extra, "-d", validate_dbname(database)]
    return as_postgres_argv(layout, args)


def database_missing(exc: RemoteCommandFailed, database: str) -> bool:
    """psql could not connect because the database is gone, or left invalid by an
    interrupted DROP DATABASE (PostgreSQL 15.4+ refuses connections to it)."""
    text = exc.stderr or str(exc)
    return (f'database "{database}" does not exist' in text
            or f'cannot connect to invalid database "{database}"' in text)


async def _run_sql(shell: RemoteShell, node: Node, layout: A9sLayout, sql: str, database: str,
                   extra: tuple[str, ...], timeout: float) -> CommandResult:
    try:
        return await shell.run_root(node.endpoint, psql_argv(layout, database, *extra),
                                    input=sql, timeout=timeout)
    except RemoteCommandFailed as exc:
        if database != MAINTENANCE_DATABASE or not database_missing(exc, database):
            raise
    return await shell.run_root(node.endpoint, psql_argv(layout, FALLBACK_DATABASE, *extra),
                                input=sql, timeout=timeout)


async def execute(
    shell: RemoteShell,
    node: Node,
    layout: A9sLayout,
    sql: str,
    *,
    database: str = MAINTENANCE_DATABASE,
    timeout: float = DEFAULT_SQL_TIMEOUT,
) -> CommandResult:
    """Run SQL (stdin) with ON_ERROR_STOP; a failing statement raises RemoteCommandFailed."""
    return await _run_sql(shell, node, layout, sql, database, ("-q",), timeout)


async def query(
    shell: RemoteShell,
    node: Node,
    layout: A9sLayout,
    sql: str,
    *,
    database: str = MAINTENANCE_DATABASE,
    timeout: float = DEFAULT_SQL_TIMEOUT,
) -> list[list[str]]:
    """Rows of the SQL's result(s), every value as text (NULL → '')."""
    res = await _run_sql(shell, node, layout, sql, database, ("-q", "-t", "--csv"), timeout)
    return parse_csv(res.stdout)


async def ensure_maintenance_database(shell: RemoteShell, node: Node, layout: A9sLayout) -> bool:
    """Create `postgres` when an interrupted restore left the server without it, or with an
    invalid one (see MAINTENANCE_DATABASE); True when it had to. The restore's psql sessions
    start there."""
    sql = ("SELECT datconnlimit = -2 FROM pg_catalog.pg_database "  # noqa: S608 - constant
           f"WHERE datname = '{MAINTENANCE_DATABASE}';")
    rows = await query(shell, node, layout, sql)
    if rows and rows[0] == ["f"]:
        return False
    # Invalid (a cut during the dump's DROP DATABASE postgres): only dropping it is allowed.
    drop = f"DROP DATABASE {MAINTENANCE_DATABASE};\n" if rows else ""
    await execute(shell, node, layout, f"{drop}CREATE DATABASE {MAINTENANCE_DATABASE};",
                  database=FALLBACK_DATABASE)
    return True


def parse_csv(text: str) -> list[list[str]]:
    return [row for row in csv.reader(io.StringIO(text)) if row]


def is_connection_failure(exc: RemoteCommandFailed) -> bool:
    """psql could not reach the server (not running, starting, shutting down)."""
    text = exc.stderr or str(exc)
    return exc.exit_status == 2 or any(
        s in text
        for s in (
            "could not connect",
            "connection to server",
            "the database system is starting up",
            "the database system is shutting down",
            "No such file or directory",
        )
    )


RELOAD_WAIT_SECONDS = 5.0


async def reload_config(
    shell: RemoteShell, node: Node, layout: A9sLayout, *, wait: float = RELOAD_WAIT_SECONDS
) -> bool:
    """`pg_reload_conf()`, then wait until new connections get the new configuration.

    The postmaster applies a reload asynchronously; backends forked after it report the new
    `pg_conf_load_time()`, so each check is a fresh psql. Returns False when the change was
    not seen within `wait` seconds (the reload still happens; callers that depend on it check
    its effect themselves). Replaces a fixed one-second sleep: typically done in ~50 ms.
    """
    rows = await query(
        shell, node, layout,
        "SELECT extract(epoch FROM pg_conf_load_time())::text, pg_reload_conf();",
    )
    before = float(rows[0][0]) if rows and rows[0] else 0.0
    deadline = asyncio.get_running_loop().time() + wait
    while True:
        rows = await query(shell, node, layout,
                           "SELECT extract(epoch FROM pg_conf_load_time())::text;")
        if rows and rows[0] and float(rows[0][0]) > before:
            return True
        if asyncio.get_running_loop().time() >= deadline:
            return False
        await asyncio.sleep(0.05)
