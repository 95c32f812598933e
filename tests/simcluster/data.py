"""Data and state helpers for tests on the simulated cluster.

Sample data to put into the primary before a backup, per-table row counts and ordered
checksums to compare a node with what was backed up, and parsers for what a person (and the
operator) reads on an a9s-pg VM: `repmgr cluster show`, `pg_stat_replication`,
`monit summary`. All queries run inside the VM as postgres (nsenter + chpst + psql over the
Unix socket), so they need neither SSH nor a password.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .render import REPMGR_CONFIG, REPMGR_DB, VARS_SH

if TYPE_CHECKING:
    from .cluster import SimCluster, SimVM

_IDENT_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

# Databases whose content differs between nodes by design (repmgr's monitoring) or that
# PostgreSQL recreates: left out of checksums unless asked for.
DEFAULT_EXCLUDED_DATABASES = frozenset({"template0", "template1", REPMGR_DB})


def _ident(name: str) -> str:
    if not _IDENT_RE.match(name):
        raise ValueError(f"not a plain SQL identifier: {name!r}")
    return name


# ---------------------------------------------------------------------------- sample data
@dataclass(frozen=True)
class SampleData:
    """What `write_sample_data` created."""

    databases: dict[str, list[str]]
    """database -> tables as `schema.table`."""
    roles: list[str]
    rows_per_table: int


def write_sample_data(
    vm: SimVM, *, rows: int = 1000, databases: tuple[str, ...] = ("shop", "crm"), seed: int = 1
) -> SampleData:
    """Create `databases` (dropped first if present), an owner role each, and a few tables with
    `rows` deterministic rows (different `seed` → different content, same shape).

    Shapes worth restoring: a non-public schema, a foreign key, a sequence, NULLs, text with
    quotes and non-ASCII characters, numeric, timestamptz, jsonb and bytea.
    """
    created: dict[str, list[str]] = {}
    roles: list[str] = []
    for db in map(_ident, databases):
        owner = _ident(f"{db}_owner")
        roles.append(owner)
        vm.psql(
            f"DROP DATABASE IF EXISTS {db} WITH (FORCE);\n"
            f"SELECT 'CREATE ROLE {owner} LOGIN' WHERE NOT EXISTS "
            f"(SELECT FROM pg_roles WHERE rolname = '{owner}')\\gexec\n"
            f"ALTER ROLE {owner} PASSWORD 'sample-{db}-password';\n"
            f"CREATE DATABASE {db} OWNER {owner};\n"
        )
        vm.psql(
            f"""
            SET ROLE {owner};
            CREATE SCHEMA sales;
            CREATE TABLE public.customers (
                id serial PRIMARY KEY,
                name text NOT NULL,
                email text,
                created_at timestamptz NOT NULL
            );
            CREATE TABLE public.orders (
                id bigserial PRIMARY KEY,
                customer_id int NOT NULL REFERENCES public.customers(id),
                amount numeric(12, 2) NOT NULL,
                note text,
                attrs jsonb
            );
            CREATE TABLE sales.events (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                kind text NOT NULL,
                payload bytea
            );
            INSERT INTO public.customers (name, email, created_at)
                SELECT 'customer ' || g || ' O''Brien ü {seed}',
                       CASE WHEN g % 7 = 0 THEN NULL ELSE 'c' || g || '@example.com' END,
                       timestamptz '2024-01-01 00:00:00+00' + g * interval '1 minute'
                FROM generate_series(1, {rows}) AS g;
            INSERT INTO public.orders (customer_id, amount, note, attrs)
                SELECT 1 + (g * 7919 + {seed}) % {rows}, ((g * 31 + {seed}) % 100000) / 100.0,
                       CASE WHEN g % 5 = 0 THEN NULL ELSE md5(g::text || '{seed}') END,
                       jsonb_build_object('g', g, 'seed', {seed},
                                          'tags', jsonb_build_array('a', g % 3))
                FROM generate_series(1, {rows}) AS g;
            INSERT INTO sales.events (kind, payload)
                SELECT 'kind-' || (g % 4), decode(md5(g::text || '{seed}'), 'hex')
                FROM generate_series(1, {rows}) AS g;
            """,  # noqa: S608 - owner is a checked identifier, seed and rows are ints
            database=db,
        )
        created[db] = ["public.customers", "public.orders", "sales.events"]
    return SampleData(databases=created, roles=roles, rows_per_table=rows)


# ---------------------------------------------------------------------------- checksums
@dataclass(frozen=True)
class TableDigest:
    rows: int
    md5: str
    """md5 of all rows as text, newline-joined, in text order: equal iff same content."""


def list_databases(vm: SimVM, *, exclude: frozenset[str] = DEFAULT_EXCLUDED_DATABASES) -> list[str]:
    out = vm.psql("SELECT datname FROM pg_database WHERE datallowconn ORDER BY datname")
    return [d for d in out.splitlines() if d and d not in exclude]


def table_checksums(
    vm: SimVM,
    databases: list[str] | None = None,
    *,
    exclude: frozenset[str] = DEFAULT_EXCLUDED_DATABASES,
) -> dict[str, TableDigest]:
    """`{"db.schema.table": TableDigest}` for every user table of `databases` (default: all
    but `exclude`). Works on a standby too (read-only queries)."""
    result: dict[str, TableDigest] = {}
    for db in databases if databases is not None else list_databases(vm, exclude=exclude):
        tables = vm.psql(
            "SELECT quote_ident(schemaname) || '.' || quote_ident(tablename) FROM pg_tables "
            "WHERE schemaname NOT IN ('pg_catalog', 'information_schema', 'repmgr') "
            "ORDER BY 1",
            database=db,
        ).splitlines()
        tables = [t for t in tables if t]
        if not tables:
            continue
        query = "\nUNION ALL\n".join(
            f"SELECT '{t.replace(chr(39), chr(39) * 2)}', count(*), "  # noqa: S608 - quote_ident()ed
            f"coalesce(md5(string_agg(x::text, E'\\n' ORDER BY x::text)), '') FROM {t} AS x"
            for t in tables
        )
        for line in vm.psql(query + ";", database=db, separator="\t").splitlines():
            name, count, digest = line.split("\t")
            result[f"{db}.{name}"] = TableDigest(rows=int(count), md5=digest)
    return result


def wait_for_replay(cluster: SimCluster, *, timeout: float = 30.0) -> None:
    """Wait until every standby has replayed the primary's current WAL position."""
    primary = cluster.primary()
    target = primary.psql("SELECT pg_current_wal_lsn()")
    deadline = time.monotonic() + timeout
    for vm in cluster.vms:
        if vm is primary:
            continue
        while True:
            caught_up = vm.psql(
                f"SELECT coalesce(pg_last_wal_replay_lsn() >= '{target}'::pg_lsn, false)"
            )
            if caught_up == "t":
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{vm.name} did not replay up to {target} in {timeout}s")
            time.sleep(0.1)


# ---------------------------------------------------------------------------- repmgr
@dataclass(frozen=True)
class RepmgrNode:
    """One row of `repmgr cluster show`."""

    id: int
    name: str
    role: str
    status: str
    """As printed, stripped: `* running`, `running`, `! running as standby`, `? unreachable`,
    `! failed`, ..."""
    upstream: str
    location: str
    priority: str
    timeline: str
    conninfo: str

    @property
    def host(self) -> str | None:
        m = re.search(r"(?:^|\s)host=(\S+)", self.conninfo)
        return m.group(1) if m else None


def parse_cluster_show(text: str) -> list[RepmgrNode]:
    """Parse the table of `repmgr cluster show` (repmgr 5.x, 9 columns)."""
    nodes: list[RepmgrNode] = []
    header_seen = False
    for line in text.splitlines():
        if "|" not in line:
            continue
        cells = [c.strip() for c in line.split("|", 8)]
        if not header_seen:
            header_seen = cells[0] == "ID"
            continue
        if len(cells) < 9 or not cells[0].isdigit():
            continue
        nodes.append(
            RepmgrNode(
                id=int(cells[0]),
                name=cells[1],
                role=cells[2],
                status=cells[3],
                upstream=cells[4],
                location=cells[5],
                priority=cells[6],
                timeline=cells[7],
                conninfo=cells[8],
            )
        )
    return nodes


def cluster_show(vm: SimVM) -> tuple[int, str]:
    """Exit status and output of `repmgr cluster show` run on `vm` as postgres (25 means
    repmgr found a problem)."""
    proc = vm.run(
        f"source {VARS_SH}; chpst -u postgres:vcap repmgr -f {REPMGR_CONFIG} cluster show",
        check=False,
    )
    return proc.returncode, proc.stdout


# ---------------------------------------------------------------------------- replication
@dataclass(frozen=True)
class ReplicationRow:
    application_name: str
    client_addr: str
    state: str
    sync_state: str


def replication_status(vm: SimVM) -> list[ReplicationRow]:
    """Rows of `pg_stat_replication` on `vm` (the primary)."""
    out = vm.psql(
        "SELECT application_name, coalesce(host(client_addr), ''), state, sync_state "
        "FROM pg_stat_replication ORDER BY application_name",
        separator="\t",
    )
    return [ReplicationRow(*line.split("\t")) for line in out.splitlines() if line]


def streaming_standbys(vm: SimVM) -> list[ReplicationRow]:
    return [r for r in replication_status(vm) if r.state == "streaming"]


def replication_slots(vm: SimVM) -> dict[str, bool]:
    """Physical replication slots on `vm`: name -> active."""
    out = vm.psql("SELECT slot_name, active FROM pg_replication_slots ORDER BY 1", separator="\t")
    return {
        name: active == "t"
        for name, active in (line.split("\t") for line in out.splitlines() if line)
    }


# ---------------------------------------------------------------------------- monit
@dataclass(frozen=True)
class MonitService:
    name: str
    status: str
    type: str


_MONIT_OLD_RE = re.compile(r"^(?P<type>[A-Z][\w ]*?) '(?P<name>[^']+)'\s+(?P<status>.+?)\s*$")
_MONIT_TYPES = frozenset(
    {"Process", "System", "File", "Filesystem", "Directory", "Host", "Net", "Program", "Fifo"}
)
_BOX_CHARS = re.compile(r"[│┃|]")


def parse_monit_summary(text: str) -> dict[str, MonitService]:
    """`{name: MonitService}` from `monit summary` output.

    Understands monit 5.33's table (plain columns without a terminal, box-drawing borders
    with one) and the `Process 'name'   running` lines of the monit 5.2 on BOSH stemcells.
    Service names have no spaces and the type is one word, so the status is what lies between
    (it may have spaces: `Not monitored - start pending`, or be cut with `...`).
    """
    services: dict[str, MonitService] = {}
    for raw in text.splitlines():
        line = raw.strip()
        m = _MONIT_OLD_RE.match(line)
        if m:
            services[m["name"]] = MonitService(m["name"], m["status"], m["type"])
            continue
        tokens = _BOX_CHARS.sub(" ", line).split()
        if len(tokens) < 3 or tokens[-1] not in _MONIT_TYPES:
            continue
        services[tokens[0]] = MonitService(tokens[0], " ".join(tokens[1:-1]), tokens[-1])
    return services
