"""The catalog query behind `DatabasesExist`, on a real PostgreSQL 15 (a throw-away local one).

A dump without `--clean` restored over a database that holds only a function or a type fails
in Restoring ("function … already exists" is not an expected error), so such a database must
count as holding objects in Decrypting. What PostgreSQL creates on its own for another object
(a table's row type, array types, a range type's constructors and multirange) and what an
extension brings must not count: an empty database with `pgcrypto` is still empty.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pgrecovery.cluster import existing_databases
from tests.localpg import LocalPostgres

pytestmark = [pytest.mark.integration]

SETUP = {
    "functions_only": "CREATE FUNCTION f(int) RETURNS int LANGUAGE sql AS 'SELECT 1';"
                      "CREATE PROCEDURE p() LANGUAGE sql AS 'SELECT 1';",
    "types_only": "CREATE TYPE mood AS ENUM ('a'); CREATE DOMAIN d AS int;"
                  "CREATE TYPE pair AS (a int, b int); CREATE TYPE fr AS RANGE (subtype = float8);",
    "extensions_only": "CREATE EXTENSION pgcrypto; CREATE EXTENSION hstore;",
    "mixed": "CREATE SCHEMA s; CREATE TABLE s.t (a int PRIMARY KEY); CREATE VIEW v AS SELECT 1;"
             "CREATE AGGREGATE s.total(int) (sfunc = int4pl, stype = int);",
    "empty": "",
}


@pytest.fixture(scope="module")
def server() -> Iterator[LocalPostgres]:
    pg = LocalPostgres().init()
    pg.start()
    try:
        for name, sql in SETUP.items():
            pg.psql(f"CREATE DATABASE {name};")
            if sql:
                pg.psql(sql, name)
        yield pg
    finally:
        pg.destroy()


def _counts(pg: LocalPostgres, database: str) -> dict[str, int]:
    out = pg.psql(existing_databases._OBJECTS_SQL, database, separator=",")
    counts: dict[str, int] = {}
    for line in out.splitlines():
        db, code, n = line.split(",")
        assert db == database
        kind = existing_databases._KINDS[code]
        counts[kind] = counts.get(kind, 0) + int(n)
    return counts


def test_functions_and_types_count_what_makes_them_not_empty(server: LocalPostgres) -> None:
    assert _counts(server, "functions_only") == {"function": 2}
    # enum, domain, composite, range: not the arrays, the multirange, nor the constructors.
    assert _counts(server, "types_only") == {"type": 4}
    assert _counts(server, "mixed") == {"table": 1, "view": 1, "function": 1}


def test_extensions_and_an_empty_database_hold_nothing(server: LocalPostgres) -> None:
    assert _counts(server, "extensions_only") == {}
    assert _counts(server, "empty") == {}
    assert _counts(server, "postgres") == {}
