"""Cluster-wide statements when the server has no `postgres` database (a restore cut between a
`--clean` dump's DROP DATABASE postgres and its CREATE leaves none): they run in template1, and
`ensure_maintenance_database` creates it again. Against a fake server that answers like psql."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from pgrecovery.adapters.ssh import CommandResult, SshEndpoint
from pgrecovery.cluster import psql
from pgrecovery.cluster.nodes import A9sLayout, Node
from pgrecovery.errors import RemoteCommandFailed

PRIMARY = Node("pg/0", "10.77.0.10")
LAYOUT = A9sLayout(postgres_major=15)
pytestmark = pytest.mark.unit


class FakeServer:
    def __init__(self, databases: set[str], invalid: frozenset[str] = frozenset()) -> None:
        self.databases = databases
        self.invalid = set(invalid)
        self.sessions: list[tuple[str, str]] = []  # (database, sql)

    async def run_root(self, node: SshEndpoint, argv: Sequence[str], *,
                       input: bytes | str | None = None, timeout: float | None = None,
                       check: bool = True) -> CommandResult:
        database = argv[argv.index("-d") + 1]
        if database not in self.databases:
            stderr = (f'psql: error: connection to server on socket "/tmp/.s.PGSQL.5432" failed: '
                      f'FATAL:  database "{database}" does not exist')
            raise RemoteCommandFailed(f"exit 2: {stderr}", exit_status=2, stderr=stderr)
        if database in self.invalid:
            stderr = f'FATAL:  cannot connect to invalid database "{database}"'
            raise RemoteCommandFailed(f"exit 2: {stderr}", exit_status=2, stderr=stderr)
        assert isinstance(input, str)
        self.sessions.append((database, input))
        for statement in filter(None, input.split("\n")):
            name = statement.split()[2].rstrip(";") if " DATABASE " in statement else ""
            if statement.startswith("DROP DATABASE "):
                self.databases.discard(name)
                self.invalid.discard(name)
            elif statement.startswith("CREATE DATABASE "):
                self.databases.add(name)
        if "FROM pg_catalog.pg_database" in input:
            if "postgres" not in self.databases:
                return CommandResult(0, "", "")
            return CommandResult(0, "t\n" if "postgres" in self.invalid else "f\n", "")
        return CommandResult(0, "f\n", "")


async def test_statements_run_in_template1_while_postgres_is_missing() -> None:
    server = FakeServer({"template1", "shop"})
    rows = await psql.query(server, PRIMARY, LAYOUT, "SELECT pg_is_in_recovery();")  # type: ignore[arg-type]
    assert rows == [["f"]]
    assert server.sessions == [("template1", "SELECT pg_is_in_recovery();")]
    # Another database is never swapped for template1: its absence is the caller's to handle.
    with pytest.raises(RemoteCommandFailed, match='database "crm" does not exist'):
        await psql.query(server, PRIMARY, LAYOUT, "SELECT 1;", database="crm")  # type: ignore[arg-type]


async def test_the_maintenance_database_is_created_once() -> None:
    server = FakeServer({"template1"})
    assert await psql.ensure_maintenance_database(server, PRIMARY, LAYOUT)  # type: ignore[arg-type]
    assert ("template1", "CREATE DATABASE postgres;") in server.sessions
    assert "postgres" in server.databases
    before = len(server.sessions)
    assert not await psql.ensure_maintenance_database(server, PRIMARY, LAYOUT)  # type: ignore[arg-type]
    assert server.sessions[before:] == [("postgres", (
        "SELECT datconnlimit = -2 FROM pg_catalog.pg_database WHERE datname = 'postgres';"))]


async def test_an_invalid_maintenance_database_is_dropped_and_created() -> None:
    # A cut during the dump's DROP DATABASE postgres: it is there, but refuses connections.
    server = FakeServer({"template1", "postgres"}, invalid=frozenset({"postgres"}))
    assert await psql.ensure_maintenance_database(server, PRIMARY, LAYOUT)  # type: ignore[arg-type]
    assert server.sessions[-1] == ("template1",
                                   "DROP DATABASE postgres;\nCREATE DATABASE postgres;")
    assert not server.invalid
    assert await psql.query(server, PRIMARY, LAYOUT, "SELECT 1;") == [["f"]]  # type: ignore[arg-type]
    assert server.sessions[-1][0] == "postgres"
