"""Classification of psql's output while restoring a pg_dumpall script.

The message shapes were captured from psql 15.18 with `-f <file>` (which prefixes the dump's
line number) and with the script on stdin (no prefix).
"""

from __future__ import annotations

import pytest

from pgrecovery.cluster.restore_errors import (
    ConnectMap,
    Recreated,
    classify_output,
    ddl_name,
    parse_connect_target,
)

pytestmark = pytest.mark.unit

DUMP = "/var/vcap/store/postgresql-restore/x.dump"

# `grep -n '^\\connect ' dump` of a pg_dumpall script
CONNECTS = """\
20:\\connect template1
40:\\connect postgres
60:\\connect repmgr_cluster
200:\\connect -reuse-previous=on "dbname='app''s db'"
"""

LOG = f"""\
psql:{DUMP}:3: error: invalid command \\restrict
psql:{DUMP}:9: ERROR:  role "postgres" already exists
psql:{DUMP}:10: ERROR:  role "repmgr" already exists
psql:{DUMP}:30: ERROR:  database "repmgr_cluster" already exists
psql:{DUMP}:65: ERROR:  schema "repmgr" already exists
psql:{DUMP}:66: ERROR:  extension "repmgr" already exists
psql:{DUMP}:80: ERROR:  duplicate key value violates unique constraint "nodes_pkey"
DETAIL:  Key (node_id)=(1) already exists.
CONTEXT:  COPY nodes, line 1
psql:{DUMP}:95: NOTICE:  relation "t" already exists, skipping
psql:{DUMP}:150: ERROR:  relation "events_node_id_idx" already exists
psql:{DUMP}:499: error: invalid command \\unrestrict
"""


def test_expected_errors_are_counted() -> None:
    report = classify_output(LOG.splitlines(), ConnectMap(CONNECTS))
    assert report.ok, report.summary()
    assert report.expected == {
        "\\restrict unknown to psql": 2,
        "role already exists": 2,
        "database already exists": 1,
        "schema already exists": 1,
        "extension already exists": 1,
        "duplicate key in repmgr tables": 1,
        "relation already exists": 1,
    }
    assert "2 x role already exists" in report.summary()


def test_duplicate_key_outside_repmgr_is_data_loss() -> None:
    log = f"""\
psql:{DUMP}:250: ERROR:  duplicate key value violates unique constraint "nodes_pkey"
DETAIL:  Key (id)=(1) already exists.
CONTEXT:  COPY nodes, line 1
"""
    report = classify_output(log.splitlines(), ConnectMap(CONNECTS))
    assert not report.ok
    assert report.unexpected[0].database == "app's db"
    assert "dump line 250" in report.summary()


def test_other_errors_fail_with_first_lines() -> None:
    log = f"""\
psql:{DUMP}:9: ERROR:  role "postgres" already exists
psql:{DUMP}:70: ERROR:  could not extend file "base/1/2": No space left on device
HINT:  Check free disk space.
psql:{DUMP}:71: ERROR:  current transaction is aborted
psql:{DUMP}:72: FATAL:  terminating connection due to administrator command
"""
    report = classify_output(log.splitlines(), ConnectMap(CONNECTS))
    assert report.unexpected_count == 3
    assert report.expected["role already exists"] == 1
    first = report.unexpected[0]
    assert "No space left on device" in first.text
    assert first.database == "repmgr_cluster"
    assert first.context == ("HINT:  Check free disk space.",)


def test_stdin_form_without_line_numbers() -> None:
    log = """\
ERROR:  role "postgres" already exists
invalid command \\restrictx
ERROR:  duplicate key value violates unique constraint "nodes_pkey"
DETAIL:  Key (node_id)=(1) already exists.
CONTEXT:  COPY nodes, line 1
ERROR:  division by zero
"""
    report = classify_output(log.splitlines())
    # Without a database, a duplicate in a table named like repmgr's is given the benefit of
    # the doubt; anything else is unexpected.
    assert report.expected["duplicate key in repmgr tables"] == 1
    assert report.unexpected_count == 1
    assert report.unexpected[0].text == "division by zero"


@pytest.mark.parametrize(
    ("args", "db"),
    [
        ("postgres", "postgres"),
        ('"weird db"', "weird db"),
        ("-reuse-previous=on \"dbname='it''s'\"", "it's"),
        ("-reuse-previous=on", None),
    ],
)
def test_connect_targets(args: str, db: str | None) -> None:
    assert parse_connect_target(args) == db


def test_connect_map_positions() -> None:
    cm = ConnectMap(CONNECTS)
    assert cm.database_at(5) == "postgres"  # before any \connect: psql's own database
    assert cm.database_at(21) == "template1"
    assert cm.database_at(60) == "postgres"  # the \connect line itself
    assert cm.database_at(61) == "repmgr_cluster"
    assert cm.database_at(10_000) == "app's db"
    assert cm.database_at(None) is None


def test_summary_names_the_unexpected_errors_first() -> None:
    """Messages are cut to a length; the error that failed the restore must survive the cut."""
    log = f"""\
psql:{DUMP}:9: ERROR:  role "postgres" already exists
psql:{DUMP}:70: ERROR:  database "app" is being accessed by other users
"""
    summary = classify_output(log.splitlines(), ConnectMap(CONNECTS)).summary()
    assert summary.startswith('1 unexpected error(s), first: ERROR: database "app" is being')
    assert summary.endswith("expected errors: 1 x role already exists")


# `grep -n -e '^\\connect ' -e '^DROP DATABASE ' …` (GREP_PATTERNS) of a `--clean` dump
CLEAN_GREP = """\
16:DROP DATABASE IF EXISTS shop;
17:DROP DATABASE IF EXISTS "Odd Db";
26:DROP ROLE "Odd Role";
27:DROP ROLE postgres;
28:DROP ROLE shop_owner;
29:DROP ROLE only_dropped;
35:CREATE ROLE "Odd Role";
37:CREATE ROLE postgres;
39:CREATE ROLE shop_owner;
81:DROP DATABASE template1;
86:CREATE DATABASE template1 WITH TEMPLATE = template0 ENCODING = 'UTF8';
92:\\connect template1
227:DROP DATABASE postgres;
232:CREATE DATABASE postgres WITH TEMPLATE = template0 ENCODING = 'UTF8';
238:\\connect postgres
293:CREATE DATABASE shop WITH TEMPLATE = template0 ENCODING = 'UTF8';
299:\\connect shop
400:CREATE DATABASE "Odd Db" WITH TEMPLATE = template0 ENCODING = 'UTF8';
405:\\connect -reuse-previous=on "dbname='Odd Db'"
"""


def test_a_database_the_dump_drops_and_creates_may_be_gone_already() -> None:
    # A power cut between a restore's DROP DATABASE template1 and its CREATE leaves none; the
    # next run's drop fails, and the CREATE right after makes it again.
    connects = ConnectMap(CLEAN_GREP)
    assert connects.recreated == Recreated(
        frozenset({"shop", "Odd Db", "template1", "postgres"}),
        frozenset({"Odd Role", "postgres", "shop_owner"}))
    assert connects.database_at(300) == "shop"
    report = classify_output([
        f'psql:{DUMP}:81: ERROR:  database "template1" does not exist',
        f'psql:{DUMP}:17: ERROR:  database "Odd Db" does not exist',
        # pg_dumpall --clean without --if-exists, restored where the role is missing
        f'psql:{DUMP}:26: ERROR:  role "Odd Role" does not exist',
    ], connects)
    assert report.ok, report.summary()
    assert report.expected == {"database the dump drops was already gone": 2,
                               "role the dump drops was already gone": 1}
    # A role the dump drops but never creates is not restored by it: its absence is an error.
    report = classify_output([f'psql:{DUMP}:29: ERROR:  role "only_dropped" does not exist',
                              f'psql:{DUMP}:90: ERROR:  role "app" does not exist'], connects)
    assert report.unexpected_count == 2


def test_a_missing_database_the_dump_does_not_create_again_is_an_error() -> None:
    only_dropped = ConnectMap("16:DROP DATABASE IF EXISTS crm;\n")
    not_created = ConnectMap(CONNECTS)  # a dump without --clean: no DROP at all
    for connects in (only_dropped, not_created):
        report = classify_output(
            [f'psql:{DUMP}:20: ERROR:  database "crm" does not exist'], connects)
        assert not report.ok
    # Not a DROP's message: a \connect to a missing database says more than that.
    report = classify_output([
        f'psql:{DUMP}:92: error: \\connect: connection to server on socket "/tmp/.s.PGSQL.5432"'
        ' failed: FATAL:  database "template1" does not exist'], ConnectMap(CLEAN_GREP))
    assert not report.ok


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        ("shop", "shop"),
        ('"Shop ""2"""', 'Shop "2"'),
        ("SHOP", "shop"),
        # UTF-8: the server folds ASCII only, and pg_dump leaves non-ASCII letters unquoted.
        ("Ärger", "Ärger"),
    ],
)
def test_ddl_names_are_read_as_the_server_reads_them(raw: str, name: str) -> None:
    assert ddl_name(raw) == name
