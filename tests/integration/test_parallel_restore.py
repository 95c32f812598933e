"""The parallel restore (dump_index → restore_script → sh) against real PostgreSQL 15.

What this proves:
* on a local server, the parallel restore of a realistic `pg_dumpall --clean --if-exists`
  dump (several databases, FKs, a partitioned table, identity and owned-by sequences, views, a
  materialized view, functions, triggers, grants, default privileges, comments, RLS, a NOT
  VALID check, quoted names, tricky text in COPY rows and function bodies, a large object)
  gives the same `pg_dumpall --schema-only` and the same per-table ordered checksums as
  `psql -f dump`, and as the source cluster; the database with the large object is restored
  serially and reported;
* restoring into a cluster that already has the roles and databases (as on a live a9s
  cluster) tolerates the same expected errors as the serial restore and nothing else;
* a psql that cannot run (no server) fails the restore at its first task;
* on the simulated a9s-pg cluster, `parallel_restore` uploads and runs the script as
  postgres:vcap through a detached job, re-attaches on a second start, reports bytes and the
  serial fallbacks, and leaves the backup's data on the primary.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pgrecovery.adapters.ssh import FileSource, SshAuth, SshPool
from pgrecovery.cluster.a9s import A9sOperations
from pgrecovery.cluster.dump_index import index_file
from pgrecovery.cluster.local_restore import LocalRestoreResult, run_local_restore
from pgrecovery.cluster.nodes import Node, ProgressEvent
from pgrecovery.cluster.parallel_restore import (
    poll_parallel_restore,
    start_parallel_restore,
    work_dir,
)
from pgrecovery.cluster.restore_errors import GREP_PATTERNS, ConnectMap, classify_output
from pgrecovery.errors import RestoreFailed
from tests.localpg import PG_BINDIR, LocalPostgres, postgres_dir
from tests.simcluster import SimCluster, table_checksums, wait_for_replay, write_sample_data
from tests.simcluster.config import PG_BINDIR as SIM_PG_BINDIR

pytestmark = [pytest.mark.integration]

FIXTURE_SQL = r"""
CREATE ROLE app_owner LOGIN;
CREATE ROLE reader;
CREATE DATABASE shop OWNER app_owner;
CREATE DATABASE crm;
CREATE DATABASE lobs;
CREATE DATABASE "Odd Db";
\connect shop
SET ROLE app_owner;
CREATE SCHEMA sales;
CREATE TYPE sales.state AS ENUM ('open', 'paid', 'shipped');
CREATE DOMAIN sales.money2 AS numeric(12, 2) CHECK (VALUE >= 0);
CREATE FUNCTION sales.norm(t text) RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT lower(t) $$;
CREATE FUNCTION public.touch() RETURNS trigger LANGUAGE plpgsql AS $body$
BEGIN
--
-- Name: fake; Type: TABLE; Schema: public; Owner: nobody
--
  NEW.note := NEW.note || E'\n\\connect x';
  RETURN NEW;
END $body$;
CREATE TABLE public.customers (id serial PRIMARY KEY, name text NOT NULL, email text UNIQUE,
                               CONSTRAINT name_len CHECK (length(name) < 100));
CREATE TABLE public.orders (id bigserial PRIMARY KEY,
                            customer_id int NOT NULL REFERENCES customers(id),
                            amount sales.money2, state sales.state DEFAULT 'open',
                            note text DEFAULT E'it''s\t"quoted"');
CREATE INDEX orders_cust ON orders (customer_id);
CREATE INDEX cust_norm ON customers (sales.norm(name));
CREATE TABLE sales.events (id bigint GENERATED ALWAYS AS IDENTITY, at date NOT NULL, kind text,
                           PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
CREATE TABLE sales.events_2024 PARTITION OF sales.events
    FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE sales.events_2025 PARTITION OF sales.events
    FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE INDEX events_kind ON sales.events (kind);
CREATE TABLE public."Odd ""T"" x" (k text PRIMARY KEY, v jsonb);
CREATE UNLOGGED TABLE public.scratch (id int);
CREATE VIEW sales.big_orders AS SELECT * FROM orders WHERE amount > 100;
CREATE SEQUENCE public.counter OWNED BY orders.note;
COMMENT ON TABLE orders IS 'the orders
--
-- Name: not_a_header; Type: TABLE; Schema: public; Owner: x
--';
COMMENT ON INDEX orders_cust IS 'by customer';
COMMENT ON COLUMN customers.email IS 'where to write';
GRANT USAGE ON SCHEMA sales TO reader;
GRANT SELECT ON orders, sales.big_orders TO reader;
ALTER DEFAULT PRIVILEGES IN SCHEMA sales GRANT SELECT ON TABLES TO reader;
CREATE TRIGGER orders_touch BEFORE UPDATE ON orders FOR EACH ROW EXECUTE FUNCTION touch();
ALTER TABLE orders ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_rows ON orders FOR SELECT TO reader USING (amount < 1000);
INSERT INTO customers (name, email) SELECT 'c' || g || ' O''Brien ü', 'c' || g || '@x'
    FROM generate_series(1, 3000) g;
INSERT INTO orders (customer_id, amount, state, note)
    SELECT 1 + g % 3000, g % 500, (ARRAY['open', 'paid', 'shipped'])[1 + g % 3]::sales.state,
           CASE g % 4 WHEN 0 THEN E'-- Name: x; Type: TABLE; Schema: a; Owner: b'
                      WHEN 1 THEN E'\\.\n\\connect evil\nCOPY t FROM stdin;'
                      WHEN 2 THEN NULL ELSE E'line\none\\' END
    FROM generate_series(1, 6000) g;
INSERT INTO sales.events (at, kind) SELECT date '2024-06-01' + (g % 400), 'k' || (g % 5)
    FROM generate_series(1, 4000) g;
INSERT INTO public."Odd ""T"" x" SELECT 'k' || g, jsonb_build_object('g', g)
    FROM generate_series(1, 50) g;
SELECT nextval('public.counter'), nextval('public.counter');
CREATE MATERIALIZED VIEW sales.mv AS SELECT kind, count(*) AS n FROM sales.events GROUP BY kind;
CREATE UNIQUE INDEX mv_kind ON sales.mv (kind);
ALTER TABLE orders ADD CONSTRAINT amount_small CHECK (amount < 100000) NOT VALID;
RESET ROLE;
\connect crm
CREATE TABLE accounts (id int PRIMARY KEY, parent int REFERENCES accounts(id), data jsonb);
INSERT INTO accounts SELECT g, CASE WHEN g > 1 THEN g - 1 END, jsonb_build_object('g', g)
    FROM generate_series(1, 2000) g;
CREATE TABLE ledger (id int GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                     account int REFERENCES accounts(id), amount numeric);
INSERT INTO ledger (account, amount) SELECT 1 + g % 2000, g FROM generate_series(1, 5000) g;
\connect lobs
CREATE TABLE docs (id int PRIMARY KEY, lo oid);
INSERT INTO docs VALUES (1, lo_from_bytea(0, 'hello large object'));
\connect "Odd Db"
CREATE TABLE t (id int PRIMARY KEY);
INSERT INTO t SELECT generate_series(1, 10);
"""

PSQL = [str(PG_BINDIR / "psql"), "-X", "--quiet", "--no-password", "-d", "postgres"]


@dataclass(frozen=True)
class Source:
    dump: Path
    schema: str
    checksums: dict[str, str]
    clean_only: Path
    """The same cluster dumped with `--clean` alone: DROP without IF EXISTS."""


def _postgres_owned_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(path, pw.pw_uid, pw.pw_gid)
    return path


@pytest.fixture(scope="module")
def source() -> Iterator[Source]:
    root = postgres_dir("pgr-prestore-src-")
    pg = LocalPostgres(root / "pg").init()
    pg.start()
    try:
        res = subprocess.run(pg.client_argv("psql", "-X", "-q", "-v", "ON_ERROR_STOP=1",
                                            "-d", "postgres"),
                             input=FIXTURE_SQL, env=pg.env, capture_output=True, text=True,
                             check=False, timeout=300)
        assert res.returncode == 0, res.stderr
        dump = root / "backup.dump"
        pg.dumpall(dump, "--clean", "--if-exists")
        clean_only = root / "backup-clean-only.dump"
        pg.dumpall(clean_only, "--clean")
        yield Source(dump, pg.schema(), pg.checksums(), clean_only)
    finally:
        pg.destroy()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def base() -> Iterator[Path]:
    """A postgres-owned directory for servers and work dirs (removed afterwards)."""
    root = postgres_dir("pgr-prestore-")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def fresh(base: Path) -> Iterator[list[LocalPostgres]]:
    servers: list[LocalPostgres] = []
    yield servers
    for pg in servers:
        pg.destroy()


def _server(servers: list[LocalPostgres], root: Path) -> LocalPostgres:
    pg = LocalPostgres(root).init()
    servers.append(pg)
    pg.start()
    return pg


def _serial(pg: LocalPostgres, dump: Path) -> list[str]:
    res = subprocess.run(pg.client_argv("psql", "-X", "--quiet", "--no-password", "-f",
                                        str(dump), "postgres"),
                         env=pg.env, capture_output=True, text=True, check=False, timeout=600)
    assert res.returncode == 0, res.stderr
    return res.stderr.splitlines()


def _parallel(pg: LocalPostgres, dump: Path, work: Path, concurrency: int = 3,
              env: dict[str, str] | None = None) -> LocalRestoreResult:
    _postgres_owned_dir(work)
    return run_local_restore(index_file(dump), dump, work, concurrency=concurrency,
                             psql_argv=PSQL, env=env or pg.env, run_as=pg.prefix,
                             timeout=600)


def _serial_expected(dump: Path, stderr: list[str]) -> dict[str, int]:
    patterns = [arg for p in GREP_PATTERNS for arg in ("-e", p)]  # as the product greps
    grep = subprocess.run(["grep", "-n", *patterns, "--", str(dump)], capture_output=True,
                          text=True, check=False).stdout
    report = classify_output(stderr, ConnectMap(grep))
    assert report.ok, report.summary()
    return dict(report.expected)


def test_parallel_restore_equals_serial_restore(
    source: Source, fresh: list[LocalPostgres], base: Path
) -> None:
    serial = _server(fresh, base / "serial")
    expected_errors = _serial_expected(source.dump, _serial(serial, source.dump))
    parallel = _server(fresh, base / "parallel")
    result = _parallel(parallel, source.dump, base / "work")

    assert result.ok, (result.exit_code, result.failed_tasks, result.report.summary())
    assert dict(result.report.expected) == expected_errors
    assert set(result.plan.fallbacks) == {"lobs"}
    assert "large objects" in result.plan.fallbacks["lobs"]
    phases = {t.phase for t in result.plan.tasks}
    assert {"globals", "pre", "data", "index", "post", "serial"} <= phases
    assert sum(o.bytes for o in result.outcomes.values()) == result.plan.total_bytes

    assert parallel.schema() == serial.schema() == source.schema
    got = parallel.checksums()
    assert got == serial.checksums()
    assert got == source.checksums
    assert got["shop.public.orders"].startswith("6000 ")
    assert got["lobs.large objects"].startswith("1 ")


def test_a_clean_dump_without_if_exists_restores_onto_a_server_without_its_objects(
    source: Source, fresh: list[LocalPostgres], base: Path
) -> None:
    """`pg_dumpall --clean` alone writes `DROP DATABASE shop;` and `DROP ROLE app_owner;`:
    on a cluster that does not have them (a new one, or one a cut restore left half-done) each
    fails with "does not exist", and the CREATE that follows makes it. Harmless, serially and
    in parallel; a restore that stopped on them would fail after the point of no return."""
    serial = _server(fresh, base / "serial")
    expected_errors = _serial_expected(source.clean_only,
                                       _serial(serial, source.clean_only))
    assert expected_errors["database the dump drops was already gone"] == 4  # shop, crm, …
    assert expected_errors["role the dump drops was already gone"] == 2  # app_owner, reader
    parallel = _server(fresh, base / "parallel")
    result = _parallel(parallel, source.clean_only, base / "work")
    assert result.ok, (result.exit_code, result.failed_tasks, result.report.summary())
    assert dict(result.report.expected) == expected_errors
    assert parallel.checksums() == serial.checksums() == source.checksums


def test_restore_into_cluster_that_has_the_roles_and_databases(
    source: Source, fresh: list[LocalPostgres], base: Path
) -> None:
    # A live a9s cluster already holds the roles and databases of the backup.
    pg = _server(fresh, base / "live")
    _serial(pg, source.dump)
    again = _server(fresh, base / "serial-again")
    _serial(again, source.dump)
    expected_errors = _serial_expected(source.dump, _serial(again, source.dump))

    result = _parallel(pg, source.dump, base / "work", concurrency=2)
    assert result.ok, (result.exit_code, result.failed_tasks, result.report.summary())
    assert dict(result.report.expected) == expected_errors
    # --clean drops the databases and the roles it can; the role psql runs as stays.
    assert result.report.expected["role already exists"] == 1
    assert result.report.expected["current user cannot be dropped"] == 1
    assert pg.schema() == source.schema
    assert pg.checksums() == source.checksums


def test_psql_that_cannot_connect_fails_the_restore_at_the_first_task(
    source: Source, fresh: list[LocalPostgres], base: Path
) -> None:
    pg = _server(fresh, base / "pg")
    env = {**pg.env, "PGHOST": str(base / "no-server-here")}
    result = _parallel(pg, source.dump, base / "work", env=env)
    assert result.exit_code == 1
    assert result.outcomes[0].exit_code == 2  # psql: connection failed
    assert set(result.outcomes) == {0}  # nothing started after the failure
    assert not result.ok
    assert "testdb" not in pg.databases()
    assert "shop" not in pg.databases()


def test_unreadable_dump_fails_the_task(
    source: Source, fresh: list[LocalPostgres], base: Path
) -> None:
    pg = _server(fresh, base / "pg")
    index = index_file(source.dump)
    work = _postgres_owned_dir(base / "work")
    missing = base / "gone.dump"  # never created
    result = run_local_restore(index, missing, work, concurrency=2, psql_argv=PSQL, env=pg.env,
                               run_as=pg.prefix, timeout=300)
    assert result.exit_code == 1
    assert result.outcomes[0].exit_code == 99  # a range could not be read
    assert not result.ok



# ------------------------------------------------------------------ simulated a9s-pg cluster

BACKUP_ID = "de2fe9e4-6535-423d-8709-dca87df7985c-1740130000777"
RUN_ID = "itest-prestore-1"


@pytest.mark.vms
@pytest.mark.slow
@pytest.mark.timeout(1800)
async def test_parallel_restore_on_the_simulated_cluster(
    healthy_sim_cluster: SimCluster, base: Path
) -> None:
    cluster = healthy_sim_cluster
    primary_vm = cluster.primary()
    write_sample_data(primary_vm, rows=2000)
    wait_for_replay(cluster)
    expected = table_checksums(primary_vm)
    dump = base / "backup.dump"
    with dump.open("wb") as fh:
        proc = primary_vm.popen(
            ["chpst", "-u", "postgres:vcap", f"{SIM_PG_BINDIR}/pg_dumpall", "--clean",
             "--if-exists"], stdout=fh)
        assert proc.wait(timeout=300) == 0
    # The accident after the backup.
    write_sample_data(primary_vm, rows=50, seed=9, databases=("shop",))
    primary_vm.psql("DELETE FROM public.orders WHERE id % 3 = 0", database="crm")
    assert table_checksums(primary_vm) != expected
    index = index_file(dump)
    assert index.fallback is None

    events: list[ProgressEvent] = []
    auth = SshAuth(cluster.ssh_user, cluster.client_key_path.read_bytes(), cluster.known_hosts)
    async with SshPool(auth, connect_timeout=5) as pool:
        ops = A9sOperations(pool, [Node(vm.name, vm.address) for vm in cluster.vms],
                            progress=events.append)
        view = await ops.probe_nodes()
        await ops.ensure_restore_dir(view.primary)
        await ops.upload_dump(view.primary, FileSource(dump), BACKUP_ID)
        await ops.ensure_standbys_stopped(view)
        await ops.ensure_repmgr_stopped_on_primary(view)
        await ops.ensure_inactive_slots_dropped(view)
        await ops.ensure_connections_blocked(view)

        with pytest.raises(RestoreFailed, match="start it first"):
            await poll_parallel_restore(ops, view, BACKUP_ID, RUN_ID)
        first = await start_parallel_restore(ops, view, BACKUP_ID, RUN_ID, index, 2)
        again = await start_parallel_restore(ops, view, BACKUP_ID, RUN_ID, index, 2)
        assert again.job_id == first.job_id  # found the job, started nothing
        status = await poll_parallel_restore(ops, view, BACKUP_ID, RUN_ID)
        for _ in range(900):
            status = await poll_parallel_restore(ops, view, BACKUP_ID, RUN_ID)
            if status.done:
                break
            assert status.bytes_total
            await asyncio.sleep(1)
        assert status.done
        assert status.report is not None
        assert status.report.ok, status.report.summary()
        assert status.report.expected["current user cannot be dropped"] == 1
        assert status.bytes_read == status.bytes_total
        assert status.fallbacks == {}
        assert status.tasks_done == status.tasks_total > 5
        assert any(e.step == "start_parallel_restore" for e in events)
        # The script ran as postgres:vcap from a work dir it owns; nothing in it names a db.
        work = cluster.vm(view.primary.name).host_path(work_dir(ops, RUN_ID))
        assert (work / "restore.sh").exists()
        assert "shop" not in (work / "restore.sh").read_text()
        assert table_checksums(primary_vm) == expected

        # Leave the cluster as the runbook does (the session's other tests use it).
        await ops.ensure_repmgr_schema_truncated(view, RUN_ID)
        await ops.ensure_primary_registered(view)
        await ops.ensure_repmgr_running_on_primary(view)
        for standby in view.standbys:
            await ops.ensure_standby_recloned(view, standby, RUN_ID)
        await ops.ensure_staging_file_removed(view, BACKUP_ID)
        await ops.ensure_connections_unblocked(view)
    assert cluster.wait_healthy(timeout=60).ok
