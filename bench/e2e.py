"""Benchmark: time to `Rejoined` — the runbook done literally by a script vs `pgrecovery recover`.

Why this script exists: the product promises a recovery at least 2x faster than the manual
runbook (../shared/seeds/a9s-pg-manual-logical-backup-recovery.txt). This brings up the
simulated a9s-pg cluster (3 VMs), writes a data set of the given size (three databases, tables
of different sizes, primary keys, secondary indexes, foreign keys), takes a real a9s backup
(pg_dumpall --clean --if-exists | gzip | openssl enc | split) into SeaweedFS, then alternates:

- manual: download every part (10 parallel transfers, like `aws s3 cp --recursive`);
  `cat $(ls -1v …) | openssl enc -d | gunzip -c > dump`; `scp` it to the primary; over `ssh`:
  stop the standbys, stop repmgr on the primary, drop inactive slots, terminate backends, clear
  startup locks, `psql --quiet postgres < dump`, truncate the repmgr tables, register the
  primary, start repmgr, then re-clone the standbys one after the other (`rm -r`, `pre-start`,
  `monit start`) and wait until each streams; remove the dump.
- pgrecovery: `pgrecovery recover -f <manifest>` with a fresh work directory (nothing cached).

Before every run the data is damaged (a table dropped, rows changed), so both methods really
restore. After every run the cluster must be healthy and every table on every node must equal
the backup's content (row count and an md5 over the rows in primary-key order) — a fast wrong
answer fails the benchmark. Prints each run's time, per-step times, medians and the ratio, and
the restore proof's share of pgrecovery's time (its two steps `prove-restore-on-primary` and
`prove-restore-on-standbys`: every table counted on every node; the budget is <= 5 %), and the
machine's busy CPU-seconds per step (manual) and per phase (pgrecovery), with the share of
all CPUs they kept busy — everything runs on this host, so this shows when the CPUs, not the
method, are the limit.

    python bench/e2e.py                      # 1 GiB of data, 3 runs each
    python bench/e2e.py --size-mb 200 --runs 1

Needs root (simulated VMs). Uses its own cluster name and subnet (pge2e, 10.77.3).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.objectstores.servers import S3Server, start_seaweedfs  # noqa: E402
from tests.scenario import Scenario, local_recover_argv  # noqa: E402
from tests.simcluster import ClusterConfig, SimCluster, missing_prerequisites  # noqa: E402
from tests.simcluster.backup import A9sBackup, make_s3_backup  # noqa: E402
from tests.simcluster.cluster import SimVM  # noqa: E402

DATABASES = {"bench_a": 0.5, "bench_b": 0.3, "bench_c": 0.2}
ROW_BYTES = 96  # plain dump bytes per row of the generated tables, measured
VARS = "/var/vcap/jobs/postgresql-ha/helpers/vars.sh"
UTILS = "/var/vcap/jobs/postgresql-ha/helpers/repmgr_utils.sh"
MONIT = "/var/vcap/bosh/bin/monit"
RESTORE_DIR = "/var/vcap/store/postgresql-restore"


# ---------------------------------------------------------------------------- data


def write_data(primary: SimVM, size_mb: int) -> None:
    total_rows = size_mb * 1_000_000 // ROW_BYTES
    for db, share in DATABASES.items():
        rows = max(1000, int(total_rows * share))
        customers, orders, events = rows // 10, rows // 2, rows - rows // 10 - rows // 2
        primary.psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE); CREATE DATABASE {db};")
        primary.psql(
            f"""
            CREATE TABLE customers (id bigint PRIMARY KEY, name text NOT NULL, email text,
                                    created timestamptz NOT NULL);
            CREATE TABLE orders (id bigint PRIMARY KEY,
                                 customer_id bigint NOT NULL REFERENCES customers(id),
                                 amount numeric(12,2) NOT NULL, note text);
            CREATE TABLE events (id bigint PRIMARY KEY, kind text NOT NULL, payload text);
            CREATE TABLE settings (id int PRIMARY KEY, value text);
            INSERT INTO customers SELECT g, 'customer ' || g || ' ' || md5(g::text),
                   'c' || g || '@example.com', '2024-01-01'::timestamptz + g * interval '1 s'
              FROM generate_series(1::bigint, {customers}) g;
            INSERT INTO orders SELECT g, 1 + (g * 7919) % {customers}, (g % 100000) / 100.0,
                   md5(g::text) || md5((g + 1)::text)
              FROM generate_series(1::bigint, {orders}) g;
            INSERT INTO events SELECT g, 'kind-' || (g % 17),
                   md5(g::text) || md5((g * 3)::text) || md5((g * 7)::text)
              FROM generate_series(1::bigint, {events}) g;
            INSERT INTO settings SELECT g, 'value ' || g FROM generate_series(1, 50) g;
            CREATE INDEX orders_customer ON orders (customer_id);
            CREATE INDEX events_kind ON events (kind);
            CREATE INDEX customers_email ON customers (email);
            """,  # noqa: S608 - numbers only
            database=db,
            timeout=3600,
        )


def checksums(vm: SimVM) -> dict[str, tuple[int, str]]:
    """`{db.table: (rows, md5 of md5(row) in primary-key order)}` for the bench tables."""
    out: dict[str, tuple[int, str]] = {}
    for db in DATABASES:
        exists = vm.psql(f"SELECT 1 FROM pg_database WHERE datname = '{db}'")  # noqa: S608
        if not exists:
            out[db] = (-1, "database missing")
            continue
        text = vm.psql(
            "SELECT 'customers', count(*), md5(string_agg(md5(t::text), '' ORDER BY id)) "
            "FROM customers t UNION ALL "
            "SELECT 'orders', count(*), md5(string_agg(md5(t::text), '' ORDER BY id)) "
            "FROM orders t UNION ALL "
            "SELECT 'settings', count(*), md5(string_agg(md5(t::text), '' ORDER BY id)) "
            "FROM settings t UNION ALL "
            "SELECT 'events', count(*), md5(string_agg(md5(t::text), '' ORDER BY id)) "
            "FROM events t",
            database=db,
            separator="\t",
            timeout=1800,
            check=False,
        )
        for line in text.splitlines():
            name, rows, digest = line.split("\t")
            out[f"{db}.{name}"] = (int(rows), digest)
        if len(text.splitlines()) < 4:
            out[f"{db}.?"] = (-1, "a table is missing")
    return out


def damage(cluster: SimCluster) -> None:
    primary = cluster.primary()
    primary.psql("DROP TABLE IF EXISTS events", database="bench_c")
    primary.psql("UPDATE customers SET name = 'damaged' WHERE id <= 1000", database="bench_a")


# ---------------------------------------------------------------------------- the runbook


class Runbook:
    """The manual runbook, one command at a time, over ssh/scp as a person would type it."""

    def __init__(self, cluster: SimCluster, store: S3Server, backup: A9sBackup, work: Path):
        self.cluster, self.store, self.backup, self.work = cluster, store, backup, work
        self.steps: dict[str, float] = {}
        self.windows: dict[str, tuple[float, float]] = {}  # wall time span of each step

    def ssh(self, vm: SimVM, command: str, *, stdin: Path | None = None) -> str:
        with stdin.open("rb") if stdin else open(os.devnull, "rb") as inp:
            proc = subprocess.run(
                self.cluster.ssh_argv(vm, command),
                stdin=inp,
                capture_output=True,
                timeout=7200,
                check=False,
            )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{vm.name}: {command!r} exited {proc.returncode}: "
                f"{proc.stderr.decode(errors='replace')[-800:]}"
            )
        return proc.stdout.decode(errors="replace")

    def timed(self, name: str, action: Callable[[], object]) -> None:
        started, wall = time.monotonic(), time.time()
        action()
        self.steps[name] = self.steps.get(name, 0.0) + time.monotonic() - started
        first = self.windows.get(name, (wall, wall))[0]
        self.windows[name] = (first, time.time())

    def wait(self, vm: SimVM, condition: str, what: str, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = subprocess.run(
                self.cluster.ssh_argv(vm, f"sudo bash -c {sh_quote(condition)}"),
                capture_output=True,
                check=False,
                timeout=60,
            )
            if proc.returncode == 0:
                return
            time.sleep(0.5)
        raise RuntimeError(f"{vm.name}: {what} not reached in {timeout:.0f}s")

    def run(self) -> float:
        started = time.monotonic()
        primary = self.cluster.primary()
        standbys = [vm for vm in self.cluster.vms if vm is not primary]
        parts = self.work / "parts"
        parts.mkdir(parents=True)
        dump = self.work / f"{self.backup.backup_id}.dump"
        key_file = self.work / "key"
        key_file.write_text(self.backup.encryption_key)
        key_file.chmod(0o600)

        def download() -> None:
            client = self.store.client()
            with concurrent.futures.ThreadPoolExecutor(10) as pool:
                futures = [
                    pool.submit(client.download_file, self.backup.bucket, p.key,
                                str(parts / Path(p.key).name))
                    for p in self.backup.parts
                ]
                for future in futures:
                    future.result()

        def decrypt() -> None:
            # The runbook pastes `-pass pass:KEY`; `file:` is the same work without the leak.
            subprocess.run(
                f"cat $(ls -1v {self.backup.backup_id}-*) | openssl enc -aes256 -md md5 -d "
                f"-pass file:{key_file} | gunzip -c > {dump}",
                shell=True,
                cwd=parts,
                check=True,
            )

        def copy() -> None:
            self.ssh(primary, f"sudo mkdir -p {RESTORE_DIR} && sudo chown root:vcap {RESTORE_DIR}"
                              f" && sudo chmod g+w {RESTORE_DIR}")
            # `bosh scp` lands in the user's home first; then a root move into the store.
            scp = self.cluster.ssh_argv(primary)
            scp[0] = "scp"
            target = scp.pop()
            subprocess.run([*scp, str(dump), f"{target}:{dump.name}"], check=True, timeout=7200)
            self.ssh(primary, f"sudo mv ~/{dump.name} {RESTORE_DIR}/{dump.name}")

        def stop_standbys() -> None:
            for vm in standbys:
                self.ssh(vm, f"sudo {MONIT} stop postgresql-ha")
                self.wait(vm, "! pgrep -x postgres >/dev/null", "postgres stopped")

        def prepare_primary() -> None:
            self.ssh(primary, f"sudo {MONIT} stop repmgr")
            self.wait(primary, "! pgrep -x repmgrd >/dev/null", "repmgrd stopped")
            sql = ("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                   "WHERE active <> 't'; SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                   "WHERE pid <> pg_backend_pid() AND backend_type = 'client backend';")
            self.ssh(primary, f"sudo bash -c {sh_quote(psql_command('postgres', sql))}")
            self.ssh(primary, "sudo bash -c 'rm -f /tmp/postgresql-startup-locks/*'")

        def restore() -> None:
            self.ssh(primary, "sudo bash -c " + sh_quote(
                f"source {VARS}; chpst -u postgres:vcap psql --quiet postgres "
                f"< {RESTORE_DIR}/{dump.name} >/dev/null 2>&1"
            ))

        def rejoin_primary() -> None:
            truncate = ("DO $$ DECLARE r record; BEGIN FOR r IN (SELECT tablename FROM pg_tables "
                        "WHERE schemaname = 'repmgr') LOOP EXECUTE 'TRUNCATE repmgr.' || "
                        "quote_ident(r.tablename) || ' CASCADE'; END LOOP; END $$;")
            self.ssh(primary, f"sudo bash -c {sh_quote(psql_command('repmgr_cluster', truncate))}")
            self.ssh(primary, "sudo chpst -u postgres:vcap bash -c " + sh_quote(
                f"source {VARS}; source {UTILS}; register_master_node;"))
            self.ssh(primary, f"sudo {MONIT} start repmgr")

        def reclone(vm: SimVM) -> Callable[[], None]:
            def run() -> None:
                self.ssh(vm, "sudo bash -c 'rm -r /var/vcap/store/postgresql15/*'")
                self.ssh(vm, "sudo /var/vcap/jobs/postgresql-ha/bin/pre-start")
                self.ssh(vm, f"sudo {MONIT} start postgresql-ha && sudo {MONIT} start repmgr")
                streaming = (  # an IP address from our own cluster config
                    "SELECT 1 FROM pg_stat_replication WHERE state = 'streaming' "  # noqa: S608
                    f"AND client_addr = '{vm.address}'"
                )
                self.wait(primary, f"{psql_command('postgres', streaming)} | grep -q 1",
                          f"{vm.name} streaming")
            return run

        self.timed("download", download)
        self.timed("decrypt", decrypt)
        self.timed("copy to primary", copy)
        self.timed("stop standbys", stop_standbys)
        self.timed("prepare primary", prepare_primary)
        self.timed("psql < dump", restore)
        self.timed("repmgr reset", rejoin_primary)
        for vm in standbys:
            self.timed("re-clone standbys", reclone(vm))
        self.timed("cleanup", lambda: self.ssh(primary, f"sudo rm -f {RESTORE_DIR}/{dump.name}"))
        return time.monotonic() - started


def sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def psql_command(db: str, sql: str) -> str:
    return f"source {VARS}; chpst -u postgres:vcap psql -tAq {db} -c {sh_quote(sql)}"


# ---------------------------------------------------------------------------- CPU


class CpuSampler:
    """Busy CPU-seconds of the whole machine over time (/proc/stat, every 0.2 s): both
    methods run their work on this host (the simulated VMs are namespaces, the store a local
    process), so the busy time between two instants is what a step cost the 2 CPUs, whoever
    spent it — it shows where the two CPUs, not the method, are the limit."""

    def __init__(self, interval: float = 0.2) -> None:
        self.samples: list[tuple[float, float]] = []  # (wall time, busy CPU-seconds so far)
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._tick = os.sysconf("SC_CLK_TCK")

    def _busy(self) -> float:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / self._tick

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), self._busy()))
            self._stop.wait(self._interval)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def busy_between(self, start: float, end: float) -> float:
        """Busy CPU-seconds between two wall times (at the sampling resolution)."""
        def at(t: float) -> float:
            before = [b for w, b in self.samples if w <= t]
            return before[-1] if before else (self.samples[0][1] if self.samples else 0.0)
        return max(0.0, at(end) - at(start))


def cpu_line(sampler: CpuSampler, windows: dict[str, tuple[float, float]]) -> str:
    ncpu = os.cpu_count() or 1
    parts = []
    for name, (start, end) in windows.items():
        busy = sampler.busy_between(start, end)
        if end - start >= 0.05:
            parts.append(f"{name} {busy:.1f} CPU-s ({100 * busy / (ncpu * (end - start)):.0f} %)")
    return ", ".join(parts)


# ---------------------------------------------------------------------------- pgrecovery


def run_pgrecovery(
    scenario: Scenario, work: Path
) -> tuple[float, dict[str, float], dict[str, tuple[float, float]]]:
    argv, status_file = local_recover_argv(scenario, work, "bench")
    started = time.monotonic()
    proc = subprocess.run(argv, cwd=work, capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"pgrecovery recover failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    status = json.loads(status_file.read_text())["status"]
    phases: dict[str, float] = {}
    windows: dict[str, tuple[float, float]] = {}  # each phase: first step start, last end
    for step in status.get("steps", []):
        if step.get("startedAt") and step.get("finishedAt"):
            start, end = _seconds(step["startedAt"]), _seconds(step["finishedAt"])
            phases[step["name"]] = end - start
            first, last = windows.get(step["phase"], (start, end))
            windows[step["phase"]] = (min(first, start), max(last, end))
    # Seconds the counts took per node (the rest of a proof step is the replay wait and SSH).
    for node, seconds in (status.get("restoreProof") or {}).get("seconds", {}).items():
        phases[f"counts on {node}"] = seconds
    return elapsed, phases, windows


def _seconds(stamp: str) -> float:
    from datetime import datetime  # noqa: PLC0415

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


# ---------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="plain dump size, about")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--name", default="pge2e")
    parser.add_argument("--subnet", default="10.77.3")
    parser.add_argument("--part-mb", type=int, default=256, help="backup part size")
    parser.add_argument("--workdir", default=None)
    parser.add_argument(
        "--methods", default="manual,pgrecovery", help="comma-separated: manual, pgrecovery"
    )
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    problems = missing_prerequisites()
    if problems:
        print("cannot run: " + "; ".join(problems), file=sys.stderr)
        return 2
    root = Path(args.workdir or tempfile.mkdtemp(prefix="pgr-e2e-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    # tmpfs: only what is written uses memory; the space check wants dump + database + margin.
    store_gib = max(4, (args.size_mb * 10) // 1024 + 2)
    config = ClusterConfig(
        name=args.name, vms=3, subnet=args.subnet, store_size_bytes=store_gib * 1024**3
    )
    cluster = SimCluster(config)
    (root / "seaweedfs").mkdir(exist_ok=True)
    store = start_seaweedfs(root / "seaweedfs")
    failures: list[str] = []
    try:
        print(f"# load before: {os.getloadavg()}; bringing up {config.name} ...", flush=True)
        cluster.up(timeout=300)
        t = time.monotonic()
        write_data(cluster.primary(), args.size_mb)
        print(f"# data written in {time.monotonic() - t:.0f}s", flush=True)
        cluster.wait_healthy(timeout=600)
        expected = checksums(cluster.primary())
        key = "pgr-" + secrets.token_urlsafe(24)
        t = time.monotonic()
        backup = make_s3_backup(
            cluster.primary(),
            endpoint_url=store.endpoint_url,
            bucket=store.new_bucket(),
            access_key_id=store.access_key,
            secret_access_key=store.secret_key,
            region=store.region or "us-east-1",
            encryption_key=key,
            part_size=args.part_mb << 20,
            dumpall_args=("--clean", "--if-exists"),
            workdir=root / "backup",
        )
        print(
            f"# backup {backup.backup_id}: plain {backup.plain_size / 1e6:.0f} MB, "
            f"ciphertext {backup.ciphertext_size / 1e6:.0f} MB in {len(backup.parts)} parts, "
            f"made in {time.monotonic() - t:.0f}s",
            flush=True,
        )
        scenario = Scenario(cluster, backup, {}, store, encryption_key=key)
        times: dict[str, list[float]] = {"manual": [], "pgrecovery": []}
        proof_shares: list[float] = []
        cpu: dict[str, list[float]] = {"manual": [], "pgrecovery": []}
        for run in range(1, args.runs + 1):
            for method in methods:
                damage(cluster)
                cluster.wait_healthy(timeout=120)
                work = root / f"{method}-{run}"
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir(parents=True)
                wall = time.time()
                with CpuSampler() as sampler:
                    if method == "manual":
                        book = Runbook(cluster, store, backup, work)
                        elapsed = book.run()
                        detail, windows = book.steps, book.windows
                    else:
                        elapsed, detail, windows = run_pgrecovery(scenario, work)
                busy = sampler.busy_between(wall, wall + elapsed)
                cpu[method].append(busy)
                health = cluster.wait_healthy(timeout=180)
                wrong = {
                    vm.name: [k for k, v in checksums(vm).items() if expected.get(k) != v]
                    for vm in cluster.vms
                }
                wrong = {k: v for k, v in wrong.items() if v}
                ok = health.ok and not wrong
                if not ok:
                    failures.append(f"{method} run {run}: wrong tables {wrong}")
                times[method].append(elapsed)
                print(
                    f"{method:10} run {run}: {elapsed:7.1f}s  equal={ok}  "
                    + ", ".join(f"{k} {v:.1f}s" for k, v in detail.items() if v >= 0.05),
                    flush=True,
                )
                print(f"{'':10} CPU: {busy:.1f} CPU-s in all = "
                      f"{100 * busy / ((os.cpu_count() or 1) * elapsed):.0f} % of "
                      f"{os.cpu_count()} CPUs; {cpu_line(sampler, windows)}", flush=True)
                if method == "pgrecovery":
                    proof = sum(v for k, v in detail.items() if k.startswith("prove-restore"))
                    counts = ", ".join(f"{k} {v:.1f}s" for k, v in detail.items()
                                       if k.startswith("counts on"))
                    proof_shares.append(100 * proof / elapsed)
                    print(f"{'':10} restore proof: {proof:.1f}s = {proof_shares[-1]:.1f} % of "
                          f"the time to Rejoined (budget 5 %); {counts}", flush=True)
                shutil.rmtree(work, ignore_errors=True)
        medians = {m: statistics.median(t) for m, t in times.items() if t}
        for m, t in times.items():
            if t:
                print(f"median {m:15}: {medians[m]:7.1f}s  (runs {[round(x, 1) for x in t]}); "
                      f"{statistics.median(cpu[m]):.1f} CPU-s")
        if proof_shares:
            print(f"restore proof share   : median {statistics.median(proof_shares):.1f} % "
                  f"(runs {[round(x, 1) for x in proof_shares]})")
        if len(medians) == 2:
            print(f"speed-up              : {medians['manual'] / medians['pgrecovery']:.2f}x"
                  "  (target >= 2x)")
        print(f"# load after: {os.getloadavg()}")
    finally:
        cluster.down()
        store.stop()
    if failures:
        print("FAILED equality checks:\n" + "\n".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
