"""The parallel restore script generator: phases in a safe order, every byte fed to exactly one
task, at most `concurrency` sessions at once, no name or dump text in the script, failures
stop it. The generated script really runs here, with `sh` and `dd`, and a fake `psql` (`cat`,
or a small shell script) instead of a server."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from pgrecovery.cluster import dump_index, restore_script
from pgrecovery.cluster.dump_index import DumpIndexer
from pgrecovery.cluster.restore_errors import RestoreReport
from pgrecovery.cluster.restore_script import (
    RestorePlan,
    build_plan,
    classify_task_log,
    default_concurrency,
    maintenance_work_mem_mb,
    merge_reports,
    parse_progress,
)
from tests.unit import dumptext


def _index(data: bytes) -> dump_index.DumpIndex:
    indexer = DumpIndexer()
    indexer.feed(data)
    return indexer.finish()


def _plan(tmp_path: Path, data: bytes, concurrency: int = 2,
          psql: list[str] | None = None) -> tuple[RestorePlan, Path, Path]:
    dump = tmp_path / "x.dump"
    dump.write_bytes(data)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    plan = build_plan(_index(data), str(dump), str(work), concurrency=concurrency,
                      psql_argv=psql or ["cat"])
    return plan, dump, work


def _run(plan: RestorePlan, work: Path, env: dict[str, str] | None = None) -> int:
    script = work / "restore.sh"
    script.write_text(plan.script)
    return subprocess.run(["sh", str(script)], env={**os.environ, **(env or {})},
                          capture_output=True, timeout=120, check=False).returncode


def _fed(work: Path, task_id: int) -> bytes:
    return (work / f"t{task_id}.log").read_bytes()


def test_script_is_valid_sh_and_holds_no_names_or_dump_text(tmp_path: Path) -> None:
    plan, _, _ = _plan(tmp_path, dumptext.dump())
    script = tmp_path / "s.sh"
    script.write_text(plan.script)
    assert subprocess.run(["sh", "-n", str(script)], check=False).returncode == 0
    for word in ("shop", "template1", "customers", "orders", "CREATE", "COPY", "SELECT",
                 "postgres", "public", "app", "\\connect", "BBBB"):
        assert word not in plan.script.replace("psql", ""), word
    # Only the template's fixed lines, task functions of integers, and chain calls.
    allowed = re.compile(
        r"^(f\d+\(\) \{ (r \d+ \d+; )+\}|d\d+\(\) \{|  (one|go) \d+ \d+|  d\d+ &|  wait"
        r"|  ok \|\| return 0|\}|one 0 \d+|if ok; then|fi|ok \|\| exit 1|exit 0)$")
    body = plan.script.split('while [ "$i" -lt 2 ]; do echo >&3; i=$((i + 1)); done\n', 1)[1]
    for line in body.splitlines():
        assert allowed.match(line), line


def test_phases_run_in_a_safe_order_and_cover_every_byte_once(tmp_path: Path) -> None:
    data = dumptext.dump()
    plan, _, work = _plan(tmp_path, data)
    assert _run(plan, work) == 0
    ix = _index(data)
    shop = ix.databases[1]
    tasks = {t.id: t for t in plan.tasks}
    outcomes = parse_progress((work / "progress").read_text())
    assert set(outcomes) == set(tasks)
    assert all(o.exit_code == 0 for o in outcomes.values())
    assert sum(o.bytes for o in outcomes.values()) == plan.total_bytes

    # Phase A: globals and every CREATE DATABASE up to its \connect, nothing else.
    assert plan.tasks[0].phase == "globals"
    first = _fed(work, 0)
    assert first.startswith(dumptext.GLOBALS.encode())
    assert first.count(b"CREATE DATABASE") == 2
    assert first.endswith(b"\\connect shop\n")
    assert b"COPY" not in first

    # Every other task of shop starts with its \connect line and preamble.
    shop_tasks = [t for t in plan.tasks if t.database == "shop"]
    assert [t.phase for t in shop_tasks][:1] == ["pre"]
    assert [t.phase for t in shop_tasks][-1] == "post"
    prefix = data[shop.connect[0]: shop.preamble[1]]
    for t in shop_tasks:
        assert _fed(work, t.id).startswith(prefix)
    fed = {t.id: _fed(work, t.id)[len(prefix):] for t in shop_tasks}
    data_fed = b"".join(fed[t.id] for t in shop_tasks if t.phase == "data")
    for e in shop.data:
        assert data_fed.count(data[e.start: e.end]) == 1
    index_fed = [fed[t.id] for t in shop_tasks if t.phase == "index"]
    assert sum(f.count(b"CREATE INDEX") + f.count(b"ADD CONSTRAINT") for f in index_fed) == 3
    # The index in tablespace `fast` gets its SET in front of it, in its own task.
    fast = next(f for f in index_fed if b"orders_customer ON" in f)
    assert fast.index(b"SET default_tablespace = fast;") < fast.index(b"orders_customer ON")
    post = fed[shop_tasks[-1].id]
    assert b"FOREIGN KEY" in post
    assert b"GRANT SELECT" in post
    assert b"CREATE INDEX orders_late" in post
    assert b"CREATE INDEX orders_id " not in post

    # The script's order: the chain of shop runs pre, data, index, post, each after the last.
    chain = plan.script[plan.script.index("d1() {"):]
    chain = chain[: chain.index("}\n")]
    order = [int(m.group(1)) for m in re.finditer(r"(?:one|go) (\d+)", chain)]
    assert [tasks[i].phase for i in order] == sorted(
        (tasks[i].phase for i in order), key=["pre", "data", "index", "post"].index)
    assert chain.count("wait") == 2
    assert chain.count("ok || return 0") == 3


def test_big_table_is_loaded_in_row_slices(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dump_index, "SPLIT_EVERY", 1500)
    data = dumptext.dump()
    plan, _, work = _plan(tmp_path, data, concurrency=4)
    assert _run(plan, work) == 0
    header = b"COPY public.orders (id, customer, note) FROM stdin;\n"
    slices = [_fed(work, t.id) for t in plan.tasks if t.phase == "data"
              and header in _fed(work, t.id)]
    assert len(slices) >= 3
    rows = b""
    for fed in slices:
        body = fed[fed.index(header) + len(header):]
        # Each slice ends its COPY with the real terminator line (other entries may follow).
        rows += body[: body.index(b"\n\\.\n") + 1]
    assert sorted(rows.splitlines()) == sorted(dumptext.ORDERS_ROWS.encode().splitlines())


def _fake_psql(tmp_path: Path, body: str) -> Path:
    fake = tmp_path / "fakepsql"
    fake.write_text("#!/bin/sh\n" + body)
    fake.chmod(0o755)
    return fake


def test_at_most_concurrency_sessions_at_once(tmp_path: Path) -> None:
    many = "".join(
        dumptext.entry(f"i{k}", "INDEX", f"CREATE INDEX i{k} ON public.orders USING btree (id);")
        for k in range(12))
    data = dumptext.dump(shop_post=many)
    fake = _fake_psql(tmp_path, """
cat > /dev/null
mkdir "$FAKE_DIR/running.$$"
ls -d "$FAKE_DIR"/running.* | wc -l >> "$FAKE_DIR/counts"
sleep 0.3
rmdir "$FAKE_DIR/running.$$"
""")
    plan, _, work = _plan(tmp_path, data, concurrency=3, psql=[str(fake)])
    assert len([t for t in plan.tasks if t.phase == "index"]) >= 3
    assert _run(plan, work, {"FAKE_DIR": str(tmp_path)}) == 0
    counts = [int(x) for x in (tmp_path / "counts").read_text().split()]
    assert len(counts) == len(plan.tasks)
    assert max(counts) <= 3
    assert max(counts) >= 2  # it does run in parallel


def test_a_task_psql_cannot_run_fails_the_script_and_stops_new_tasks(tmp_path: Path) -> None:
    fake = _fake_psql(tmp_path, """
cat > /dev/null
n=$(cat "$FAKE_DIR/n" 2>/dev/null || echo 0); n=$((n + 1)); echo $n > "$FAKE_DIR/n"
[ "$n" -eq 2 ] && { echo "psql: error: connection to server failed" >&2; exit 2; }
exit 0
""")
    plan, _, work = _plan(tmp_path, dumptext.dump(), concurrency=1, psql=[str(fake)])
    assert _run(plan, work, {"FAKE_DIR": str(tmp_path)}) == 1
    outcomes = parse_progress((work / "progress").read_text())
    assert [o.exit_code for o in outcomes.values()] == [0, 2]
    assert (work / "failed").exists()
    failed = next(i for i, o in outcomes.items() if o.exit_code == 2)
    assert "connection to server failed" in (work / f"t{failed}.log").read_text()


def test_unreadable_dump_fails_the_task(tmp_path: Path) -> None:
    plan, dump, work = _plan(tmp_path, dumptext.dump())
    dump.unlink()
    assert _run(plan, work) == 1
    assert parse_progress((work / "progress").read_text())[0].exit_code == 99


def test_whole_dump_fallback_is_one_serial_psql(tmp_path: Path) -> None:
    data = dumptext.dump(globals_=dumptext.GLOBALS.replace("SET default_transaction",
                                                           "\\set x 1\nSET default_transaction"))
    plan, _, work = _plan(tmp_path, data)
    assert [(t.phase, t.ranges) for t in plan.tasks] == [("serial", ((0, len(data)),))]
    assert "meta-command" in plan.fallbacks["*"]
    assert _run(plan, work) == 0
    assert _fed(work, 0) == data


def test_database_fallback_is_one_serial_psql_after_phase_a(tmp_path: Path) -> None:
    blob = dumptext.entry("16397", "BLOB", "SELECT pg_catalog.lo_create('16397');", "-")
    data = dumptext.dump(shop_pre=dumptext.PRE_DATA + blob)
    plan, _, work = _plan(tmp_path, data)
    assert set(plan.fallbacks) == {"shop"}
    shop = [t for t in plan.tasks if t.database == "shop"]
    assert [t.phase for t in shop] == ["serial"]
    assert _run(plan, work) == 0
    ix = _index(data)
    assert _fed(work, shop[0].id) == data[ix.databases[1].connect[0]: ix.databases[1].end]
    assert _fed(work, 0).endswith(b"\\connect shop\n")  # its CREATE DATABASE ran in phase A


@pytest.mark.parametrize("path", ["relative/x", "/tmp/x y", "/tmp/../etc/x", "/tmp/$(id)",
                                  "/tmp/x;rm", ""])
def test_unsafe_paths_are_refused(tmp_path: Path, path: str) -> None:
    ix = _index(dumptext.dump())
    with pytest.raises(ValueError, match="unsafe"):
        build_plan(ix, path, str(tmp_path), concurrency=2, psql_argv=["psql"])
    with pytest.raises(ValueError, match="unsafe"):
        build_plan(ix, str(tmp_path / "x"), path, concurrency=2, psql_argv=["psql"])


@pytest.mark.parametrize("argv", [[], ["psql", "-c", "DROP TABLE x"], ["psql;id"],
                                  ["psql", "$(id)"]])
def test_unsafe_psql_command_is_refused(tmp_path: Path, argv: list[str]) -> None:
    with pytest.raises(ValueError, match="unsafe psql"):
        build_plan(_index(dumptext.dump()), "/x.dump", "/w", concurrency=2, psql_argv=argv)


@pytest.mark.parametrize("concurrency", [0, -1, 65])
def test_concurrency_bounds(concurrency: int) -> None:
    with pytest.raises(ValueError, match="concurrency"):
        build_plan(_index(dumptext.dump()), "/x.dump", "/w", concurrency=concurrency,
                   psql_argv=["psql"])


def test_default_concurrency_from_nproc() -> None:
    assert default_concurrency("2\n") == 2
    assert default_concurrency("1") == 2
    assert default_concurrency("8") == 8
    assert default_concurrency("96") == 16
    for bad in ("", "0", "two", "-4"):
        with pytest.raises(ValueError, match="nproc"):
            default_concurrency(bad)


def test_maintenance_work_mem_from_meminfo() -> None:
    assert maintenance_work_mem_mb("MemTotal:       16384000 kB\n", 4) == 1000
    assert maintenance_work_mem_mb("MemTotal:   1024000 kB\n", 8) == 64
    assert maintenance_work_mem_mb("MemTotal: 1024000000 kB\n", 2) == 2048
    assert maintenance_work_mem_mb("garbage", 2) == 256


def test_progress_lines_and_reports() -> None:
    text = "0 0 100 1.5 2.0\n3 2 50 1.0 4.0\nbroken\n4 0 7 1.0"
    outcomes = parse_progress(text)
    assert set(outcomes) == {0, 3}
    assert outcomes[3].exit_code == 2
    assert outcomes[3].seconds == 3.0
    plan_task = build_plan(_index(dumptext.dump()), "/x.dump", "/w", concurrency=2,
                           psql_argv=["psql"]).tasks[1]
    report = classify_task_log(plan_task, [
        "psql:<stdin>:7: ERROR:  role \"app\" already exists",
        "psql:<stdin>:9: ERROR:  duplicate key value violates unique constraint \"x_pkey\"",
        "CONTEXT:  COPY x, line 1"])
    assert report.expected["role already exists"] == 1
    assert report.unexpected[0].database == plan_task.database
    merged = merge_reports([report, report, RestoreReport()])
    assert merged.expected["role already exists"] == 2
    assert merged.unexpected_count == 2


def test_tasks_json_names_each_task_database() -> None:
    plan = build_plan(_index(dumptext.dump()), "/x.dump", "/w", concurrency=2,
                      psql_argv=["psql"])
    raw = json.loads(plan.tasks_json())
    assert raw["total_bytes"] == plan.total_bytes
    assert [t["database"] for t in raw["tasks"]] == [t.database for t in plan.tasks]
    assert "ranges" not in raw["tasks"][0]


def test_the_plan_knows_which_databases_the_dump_creates_again() -> None:
    # `--clean`: shop in the globals' drops; template1 by its own DROP before its CREATE.
    text = dumptext.dump().decode().replace(
        "-- Dumped by pg_dump version 15.18\n\n" + dumptext.PREAMBLE + "--\n-- Name: template1;",
        "-- Dumped by pg_dump version 15.18\n\n" + dumptext.PREAMBLE
        + "DROP DATABASE template1;\n--\n-- Name: template1;", 1)
    assert "DROP DATABASE template1;" in text
    plan = build_plan(_index(text.encode()), "/x.dump", "/w", concurrency=2,
                      psql_argv=["psql"])
    assert plan.recreated.databases == {"shop", "template1"}
    assert json.loads(plan.tasks_json())["recreated"]["databases"] == ["shop", "template1"]
    globals_task = next(t for t in plan.tasks if t.phase == "globals")
    gone = ['psql:<stdin>:40: ERROR:  database "template1" does not exist']
    assert classify_task_log(globals_task, gone, plan.recreated).ok
    assert not classify_task_log(globals_task, gone).ok


# ----------------------------------------------------------------- WAL-free load


def _wal_free_plan(tmp_path: Path, data: bytes, **kw: object) -> tuple[RestorePlan, Path]:
    dump = tmp_path / "x.dump"
    dump.write_bytes(data)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    plan = build_plan(_index(data), str(dump), str(work), concurrency=4, psql_argv=["cat"],
                      wal_free=True, **kw)  # type: ignore[arg-type]
    (work / "freeze.sql").write_text(plan.freeze_sql)
    return plan, work


def test_wal_free_wraps_each_fresh_table_in_truncate_and_copy_freeze(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dump_index, "SPLIT_EVERY", 1500)  # orders would be sliced otherwise
    plan, work = _wal_free_plan(tmp_path, dumptext.dump())
    assert plan.frozen == 2  # customers, orders; `empty` has no CREATE TABLE in pre-data
    assert _run(plan, work) == 0
    fed = b"".join(_fed(work, t.id) for t in plan.tasks if t.phase == "data")
    for table, cols, rows in (("customers", "id, note", dumptext.TRICKY_ROWS),
                              ("orders", "id, customer, note", dumptext.ORDERS_ROWS)):
        block = (f"BEGIN;\nTRUNCATE ONLY public.{table};\n").encode()
        assert fed.count(block) == 1, table
        after = fed[fed.index(block):]
        copy = f"COPY public.{table} ({cols}) FROM stdin WITH (FREEZE);\n{rows}\\.\n"
        assert copy.encode() in after
        # The transaction ends right after its entry, before the next one begins.
        tail = after[after.index(copy.encode()) + len(copy):]
        assert tail.lstrip(b"\n").startswith(b"COMMIT;\n")
    # A table without its CREATE TABLE in this database's pre-data loads as before.
    assert b"COPY public.empty (id) FROM stdin;\n\\.\n" in fed
    assert b"TRUNCATE ONLY public.empty" not in fed
    # Row slices of one table cannot each TRUNCATE it: orders is one task.
    assert sum(b"COPY public.orders" in _fed(work, t.id) for t in plan.tasks) == 1


def test_wal_free_script_still_holds_only_integers(tmp_path: Path) -> None:
    plan, _ = _wal_free_plan(tmp_path, dumptext.dump())
    for word in ("customers", "orders", "TRUNCATE", "FREEZE", "COPY", "BEGIN"):
        assert word not in plan.script, word
    body = plan.script.split('while [ "$i" -lt 4 ]; do echo >&3; i=$((i + 1)); done\n', 1)[1]
    allowed = re.compile(
        r"^(f\d+\(\) \{ (r \d+ \d+; )+\}|d\d+\(\) \{|  (one|go) \d+ \d+|  d\d+ &|  wait"
        r"|  ok \|\| return 0|\}|one 0 \d+|if ok; then|fi|ok \|\| exit 1|exit 0)$")
    for line in body.splitlines():
        assert allowed.match(line), line
    # freeze.sql: fixed statements around names that passed _SAFE_TABLE, nothing else.
    stmt = re.compile(r"^(BEGIN;|TRUNCATE ONLY public\.(customers|orders);|COMMIT;"
                      r"| WITH \(FREEZE\);)$")
    for line in plan.freeze_sql.splitlines():
        assert stmt.match(line), line


def test_wal_free_only_in_databases_dropped_before_the_restore(tmp_path: Path) -> None:
    kept = dumptext.dump(globals_=dumptext.GLOBALS.replace("DROP DATABASE IF EXISTS shop;\n",
                                                           ""))
    plan, work = _wal_free_plan(tmp_path, kept)
    assert plan.frozen == 0
    assert _run(plan, work) == 0
    assert b"TRUNCATE" not in b"".join(_fed(work, t.id) for t in plan.tasks)
    # ... unless pgrecovery drops it first (replaceExistingDatabases).
    plan, _ = _wal_free_plan(tmp_path, kept, fresh_databases=["shop"])
    assert plan.frozen == 2


@pytest.mark.parametrize("name", [
    'public."a\\b"', 'public."caf\u00e9"', "public.Upper", 'public."tab\tx"',
])
def test_wal_free_refuses_names_it_cannot_prove_safe(tmp_path: Path, name: str) -> None:
    data = dumptext.PRE_DATA + dumptext.entry(
        name.split(".", 1)[-1], "TABLE", f"CREATE TABLE {name} (id int);")
    body = dumptext.entry(name, "TABLE DATA", f"COPY {name} (id) FROM stdin;\n1\n\\.",
                          data=True)
    raw = dumptext.dump(shop_pre=data, shop_data=body + dumptext.DATA)
    plan, _ = _wal_free_plan(tmp_path, raw)
    assert not plan.fallbacks
    assert name not in plan.freeze_sql
    assert plan.frozen == 2  # customers, orders still


@pytest.mark.parametrize("name", [
    "public.t; DROP TABLE y", 'public."x"; DROP TABLE y; --"', 'public."a"b"', "t",
    'public."new\nline"', "public.t\\! id", 'public."x" (a)', "a.b.c",
])
def test_safe_table_names(name: str) -> None:
    assert restore_script._unquote(name) is None
    assert restore_script._unquote('public."My ""T"""') == ("public", 'My "T"')
    assert restore_script._unquote('s."a;b".x') is None


def test_wal_free_takes_quoted_names(tmp_path: Path) -> None:
    pre = dumptext.PRE_DATA + dumptext.entry('My "T"', "TABLE",
                                             'CREATE TABLE public."My ""T""" (id int);')
    data = dumptext.entry('My "T"', "TABLE DATA",
                          'COPY public."My ""T""" (id) FROM stdin;\n1\n\\.', data=True)
    plan, work = _wal_free_plan(tmp_path, dumptext.dump(shop_pre=pre, shop_data=data))
    assert plan.frozen == 1
    assert _run(plan, work) == 0
    fed = b"".join(_fed(work, t.id) for t in plan.tasks)
    assert b'TRUNCATE ONLY public."My ""T""";\n' in fed
    assert b'COPY public."My ""T""" (id) FROM stdin WITH (FREEZE);\n1\n\\.\n' in fed
