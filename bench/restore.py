"""Benchmark: `psql -f dump` (the runbook) against the parallel restore of the same dump.

Why this script exists: the Restoring phase dominates the time to recover, and the parallel
restore (`dump_index` → `restore_script`) promises to be faster while giving the same result.
This builds a realistic cluster on a local PostgreSQL 15 (several databases; tables of very
different sizes, one large; a partitioned table; indexes, PK/UNIQUE and foreign keys,
sequences, a view, functions, a trigger, grants, comments; 200 small tables), dumps it with
`pg_dumpall --clean --if-exists`, then restores it alternately both ways, each run into the
same fresh cluster (a copy of one initdb), and prints medians, the ratio, and peak RSS of the
client side (psql, or the script with its dd and psql processes; not the server).

Every run is checked against the source cluster in the same run: `pg_dumpall --schema-only`
equal (only the per-dump `\\restrict` token lines dropped) and per-table ordered checksums
equal (tables, materialized views, sequences, large objects). A fast wrong answer fails.

    python bench/restore.py                    # ~1 GB dump, 3 runs each, concurrency = nproc
    python bench/restore.py --size 256M --runs 5 --concurrency 2

The parallel side runs the very script the operator runs on the primary
(`pgrecovery.cluster.local_restore`), as the postgres user, with psql from PostgreSQL 15.
The machine is shared: the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "operator"))

from tests.localpg import PG_BINDIR, LocalPostgres, postgres_dir  # noqa: E402

from pgrecovery.cluster import restore_script  # noqa: E402
from pgrecovery.cluster.dump_index import index_file  # noqa: E402
from pgrecovery.cluster.local_restore import run_local_restore  # noqa: E402
from pgrecovery.cluster.restore_script import Task, default_concurrency  # noqa: E402

# Bytes of dump per row, measured on this generator (used to size the tables).
_ROW_BYTES = {"items": 81, "events": 103, "notes": 130, "orders": 55, "small": 41}

SCHEMA_SQL = """
CREATE ROLE shop_owner LOGIN;
CREATE ROLE analyst;
CREATE DATABASE shop OWNER shop_owner;
CREATE DATABASE analytics;
CREATE DATABASE crm;
CREATE DATABASE small;
\\connect shop
SET ROLE shop_owner;
CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, email text UNIQUE,
                        created_at timestamptz NOT NULL);
CREATE TABLE orders (id bigserial PRIMARY KEY, customer_id int NOT NULL REFERENCES customers(id),
                     amount numeric(12, 2) NOT NULL, status text, created_at timestamptz);
CREATE TABLE order_items (id bigserial PRIMARY KEY, order_id bigint NOT NULL REFERENCES orders(id),
                          sku text NOT NULL, qty int NOT NULL, price numeric(10, 2),
                          description text);
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.status := coalesce(NEW.status, 'open'); RETURN NEW; END $$;
CREATE TRIGGER orders_touch BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION touch();
CREATE VIEW big_orders AS SELECT * FROM orders WHERE amount > 900;
COMMENT ON TABLE order_items IS 'line items';
GRANT SELECT ON orders, big_orders TO analyst;
RESET ROLE;
\\connect analytics
CREATE TABLE events (id bigint GENERATED ALWAYS AS IDENTITY, at date NOT NULL, kind text,
                     payload jsonb, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
CREATE TABLE events_q1 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2024-04-01');
CREATE TABLE events_q2 PARTITION OF events FOR VALUES FROM ('2024-04-01') TO ('2024-07-01');
CREATE TABLE events_q3 PARTITION OF events FOR VALUES FROM ('2024-07-01') TO ('2024-10-01');
CREATE TABLE events_q4 PARTITION OF events FOR VALUES FROM ('2024-10-01') TO ('2025-01-01');
\\connect crm
CREATE TABLE contacts (id int PRIMARY KEY, name text, phone text);
CREATE TABLE notes (id bigserial PRIMARY KEY, contact_id int REFERENCES contacts(id),
                    body text, created_at timestamptz);
COMMENT ON COLUMN notes.body IS 'free text';
"""


# Filled with row counts only (str.format of integers).
DATA_SQL = {
    "shop": """
INSERT INTO customers SELECT g, 'customer ' || g, 'c' || g || '@example.com',
    timestamptz '2024-01-01' + g * interval '1 minute' FROM generate_series(1, {customers}) g;
INSERT INTO orders (customer_id, amount, status, created_at)
    SELECT 1 + (g::bigint * 7919) % {customers}, (g * 31 % 100000) / 100.0,
           (ARRAY['paid', 'open', 'shipped', NULL])[1 + g % 4],
           timestamptz '2024-01-01' + g * interval '1 second'
    FROM generate_series(1, {orders}) g;
INSERT INTO order_items (order_id, sku, qty, price, description)
    SELECT 1 + (g::bigint * 104729) % {orders}, 'SKU-' || (g % 5000), 1 + g % 9,
           (g % 10000) / 100.0, 'item ' || md5(g::text) || ' ' || repeat('x', g % 40)
    FROM generate_series(1, {items}) g;
CREATE INDEX order_items_order ON order_items (order_id);
CREATE INDEX order_items_sku ON order_items (sku);
CREATE INDEX orders_customer ON orders (customer_id);
""",
    "analytics": """
INSERT INTO events (at, kind, payload)
    SELECT date '2024-01-01' + (g % 366), 'kind-' || (g % 17),
           jsonb_build_object('g', g, 'user', 'u' || (g % 9973), 'v', md5(g::text))
    FROM generate_series(1, {events}) g;
CREATE INDEX events_kind ON events (kind);
""",
    "crm": """
INSERT INTO contacts SELECT g, 'contact ' || g, '+49 30 ' || g
    FROM generate_series(1, {contacts}) g;
INSERT INTO notes (contact_id, body, created_at)
    SELECT 1 + g % {contacts}, 'note ' || md5(g::text) || md5((g + 1)::text),
           timestamptz '2024-01-01' + g * interval '1 second'
    FROM generate_series(1, {notes}) g;
CREATE INDEX notes_contact ON notes (contact_id);
""",
}
SMALL_TABLE_SQL = """
CREATE TABLE t{k} (id int PRIMARY KEY, v text);
INSERT INTO t{k} SELECT g, md5((g * {k})::text) FROM generate_series(1, {rows}) g;
"""


def data_sql(size: int) -> dict[str, str]:
    """Per database, the SQL that fills it with about `size` bytes of dump in total."""
    def rows(kind: str, share: float) -> int:
        return max(10, int(size * share / _ROW_BYTES[kind]))

    counts = {"items": rows("items", 0.40), "orders": rows("orders", 0.08),
              "events": rows("events", 0.30), "notes": rows("notes", 0.17)}
    counts["customers"] = max(10, counts["orders"] // 10)
    counts["contacts"] = max(10, counts["notes"] // 20)
    small = max(1, rows("small", 0.05) // 200)
    result = {db: sql.format(**counts) for db, sql in DATA_SQL.items()}
    result["small"] = "".join(SMALL_TABLE_SQL.format(k=k, rows=small) for k in range(200))
    return result


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def psql_run(pg: LocalPostgres, sql: str, database: str = "postgres") -> None:
    res = subprocess.run(pg.client_argv("psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d",
                                        database),
                         input=sql, env=pg.env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"psql failed: {res.stderr[-2000:]}")


def max_rss_kib(report: Path) -> int:
    text = report.read_text().split()
    return int(text[-1]) if text else 0


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat (idle and iowait count as not busy)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
    return total - fields[3] - fields[4], total


def phase_profile(tasks: Sequence[Task], progress: Path) -> str:
    """Where the parallel restore's time went: per phase, the wall span from its first task's
    start to its last task's end, and the psql-seconds spent in it (busy/span ≈ how many
    sessions it kept running). Phases of different databases overlap."""
    by_id = {t.id: t for t in tasks}
    spans: dict[str, list[float]] = {}
    busy: dict[str, float] = {}
    text = progress.read_text() if progress.exists() else ""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 5 or not parts[0].isdigit() or int(parts[0]) not in by_id:
            continue
        phase = by_id[int(parts[0])].phase
        started, ended = float(parts[3]), float(parts[4])
        lo_hi = spans.setdefault(phase, [started, ended])
        lo_hi[0], lo_hi[1] = min(lo_hi[0], started), max(lo_hi[1], ended)
        busy[phase] = busy.get(phase, 0.0) + ended - started
    order = ["globals", "pre", "data", "index", "post", "serial"]
    return "phases (wall span / psql-seconds): " + ", ".join(
        f"{p} {spans[p][1] - spans[p][0]:.1f}/{busy[p]:.1f}" for p in order if p in spans
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", help="approximate plain dump size (1G)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each (default 3)")
    parser.add_argument("--concurrency", type=int,
                        help="parallel sessions (default: from nproc, as the operator)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--modes", default="psql -f,parallel,WAL-free",
                        help="comma-separated, in the order run each round: psql -f, parallel, "
                             "WAL-free (wal_level minimal, TRUNCATE + COPY FREEZE, big tables "
                             "whole), WAL-free sliced (big tables in row slices without FREEZE)")
    args = parser.parse_args()
    size = parse_size(args.size)
    nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout
    concurrency = args.concurrency or default_concurrency(nproc)

    work = postgres_dir("pgr-bench-restore-")
    try:
        t = time.perf_counter()
        source = LocalPostgres(work / "source").init()
        source.start()
        psql_run(source, SCHEMA_SQL)
        for db, sql in data_sql(size).items():
            psql_run(source, sql, db)
        dump = work / "backup.dump"
        source.dumpall(dump, "--clean", "--if-exists")
        dump_size = dump.stat().st_size
        print(f"dump: {dump_size / 1e6:.0f} MB pg_dumpall --clean --if-exists of 5 databases "
              f"({time.perf_counter() - t:.0f}s to build)", flush=True)
        t = time.perf_counter()
        ref_schema, ref_sums = source.schema(), source.checksums()
        source.destroy()
        print(f"reference: {len(ref_sums)} relations checksummed "
              f"({time.perf_counter() - t:.0f}s)", flush=True)

        t, cpu = time.perf_counter(), time.process_time()
        index = index_file(dump)
        index_s, index_cpu = time.perf_counter() - t, time.process_time() - cpu
        print(f"index: {index_s:.2f}s wall, {index_cpu:.2f}s CPU incl. reading "
              f"({dump_size / max(index_cpu, 1e-6) / 1e6:.0f} MB/s per CPU), "
              f"{sum(len(d.data) for d in index.databases)} data entries, serial fallback: "
              f"{index.fallbacks or index.fallback or 'none'}", flush=True)

        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        unknown = set(modes) - {"psql -f", "parallel", "WAL-free", "WAL-free sliced"}
        if unknown or "psql -f" not in modes:
            parser.error(f"--modes: unknown {sorted(unknown)} (psql -f is the reference)")
        target = LocalPostgres(work / "target").init()
        fresh = work / "fresh-data"
        target.snapshot(fresh)
        # The WAL-free modes on a server with the settings `cluster.wal_free` gives the primary.
        wal_free_target = LocalPostgres(
            work / "target-wf",
            conf="wal_level = minimal\nmax_wal_senders = 0\narchive_mode = off\n").init()
        fresh_wf = work / "fresh-data-wf"
        wal_free_target.snapshot(fresh_wf)
        plain_target = target
        rss_file = work / "rss"
        timed = ["/usr/bin/time", "-f", "%M", "-o", str(rss_file)]
        psql = str(PG_BINDIR / "psql")
        results: dict[str, list[tuple[float, int]]] = {m: [] for m in modes}
        # The machine's ceiling: a restore that keeps a fraction b of all CPUs busy can get at
        # most 1/b faster by running more sessions on the same CPUs.
        cpu_busy: dict[str, list[float]] = {m: [] for m in modes}
        loads: list[str] = []
        ok = True
        for round_ in range(1, args.runs + 1):
            for name, runs in results.items():
                wal_free = name.startswith("WAL-free")
                target = wal_free_target if wal_free else plain_target
                (plain_target if wal_free else wal_free_target).stop()
                target.reset_to(fresh_wf if wal_free else fresh)
                restore_script.FREEZE_WHOLE_TABLES = name != "WAL-free sliced"
                rss_file.unlink(missing_ok=True)
                cpu_before = cpu_times()
                start = time.perf_counter()
                if name == "psql -f":
                    res = subprocess.run(
                        [*timed, *target.client_argv("psql", "-X", "--quiet", "--no-password",
                                                     "-f", str(dump), "postgres")],
                        env=target.env, capture_output=True, text=True, check=False)
                    elapsed = time.perf_counter() - start
                    good = res.returncode == 0
                else:
                    run_dir = work / f"run-{round_}-{name.replace(' ', '-')}"
                    run_dir.mkdir()
                    shutil.chown(run_dir, "postgres" if target.prefix else None,
                                 "postgres" if target.prefix else None)
                    result = run_local_restore(
                        index, dump, run_dir, concurrency=concurrency,
                        psql_argv=[psql, "-X", "--quiet", "--no-password", "-d", "postgres"],
                        env=target.env, run_as=[*timed, *target.prefix], wal_free=wal_free)
                    elapsed = time.perf_counter() - start
                    good = result.ok
                    print("    " + phase_profile(result.plan.tasks, run_dir / "progress"))
                    if not good:
                        print(f"  parallel restore failed: exit {result.exit_code}, "
                              f"tasks {result.failed_tasks}, {result.report.summary()}")
                cpu_after = cpu_times()
                busy = (cpu_after[0] - cpu_before[0]) / max(1, cpu_after[1] - cpu_before[1])
                cpu_busy[name].append(busy)
                rss = max_rss_kib(rss_file)
                load = os.getloadavg()[0]
                loads.append(f"{load:.1f}")
                t = time.perf_counter()
                same = target.schema() == ref_schema and target.checksums() == ref_sums
                check_s = time.perf_counter() - t
                ok = ok and good and same
                runs.append((elapsed, rss))
                print(f"  run {round_} {name:<9} {elapsed:7.2f}s  "
                      f"{dump_size / elapsed / 1e6:5.1f} MB/s  identical to source: "
                      f"{'yes' if same else 'NO'} (checked in {check_s:.0f}s), load {load:.1f}, "
                      f"CPUs busy {busy:.0%}",
                      flush=True)
        plain_target.destroy()
        wal_free_target.destroy()

        print()
        print(f"{'':<12}{'median s':>10}{'min s':>8}{'MB/s':>8}{'peak RSS':>11}")
        medians = {}
        for name, runs in results.items():
            walls = [w for w, _ in runs]
            medians[name] = statistics.median(walls)
            rss = max(r for _, r in runs) / 1024
            print(f"{name:<12}{medians[name]:>10.2f}{min(walls):>8.2f}"
                  f"{dump_size / medians[name] / 1e6:>8.1f}{rss:>8.0f} MiB")
        print()
        for name in modes[1:] if modes[0] == "psql -f" else [m for m in modes if m != "psql -f"]:
            print(f"speed-up (psql -f / {name}, medians, concurrency {concurrency}, "
                  f"{nproc.strip()} CPUs): {medians['psql -f'] / medians[name]:.2f}x")
        serial_busy = statistics.median(cpu_busy["psql -f"])
        print(f"CPU busy (median, all {nproc.strip()} CPUs): " + ", ".join(
            f"{m} {statistics.median(cpu_busy[m]):.0%}" for m in modes)
            + f" -> ceiling for any parallel restore on this machine about "
              f"{1 / max(serial_busy, 1e-6):.2f}x")
        uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout
        print(f"load average at the end of each run: {' '.join(loads)}; uptime: {uptime.strip()}")
        print(f"every restore identical to the source (schema and checksums): "
              f"{'yes' if ok else 'NO'}")
        return 0 if ok else 1
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            for sub in ("source", "target", "target-wf"):
                LocalPostgres(work / sub).stop()
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
