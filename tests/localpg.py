"""A throw-away local PostgreSQL 15 server (initdb into a temp dir, Unix socket only).

Why this exists: the parallel restore's integration tests and `bench/restore.py` compare
`psql < dump` with the parallel restore on a real server, each run from the same fresh state.
No TCP port is opened (`listen_addresses = ''`), so parallel test runs and other agents on the
machine never collide; the socket directory is the data directory's parent.

PostgreSQL refuses to run as root: when the tests run as root, the server and every client
run as the `postgres` OS user (`runuser -u postgres`), which is also who owns the files.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

PG_BINDIR = Path("/usr/lib/postgresql/15/bin")

# Settings of a test server: small enough for a shared 2-core machine, fsync off because the
# data is thrown away (both contenders of the bench get the same setting).
_CONF = """
listen_addresses = ''
max_connections = 60
shared_buffers = 256MB
fsync = off
full_page_writes = off
max_wal_size = 4GB
checkpoint_timeout = 30min
log_min_messages = warning
"""


# Names come quote_ident()ed from the catalog; {lit} is that name as a literal.
_SEQUENCE_SQL = "SELECT {lit}, 1, last_value::text || ' ' || is_called::text FROM {name}"
_TABLE_SQL = ("SELECT {lit}, count(*), coalesce(md5(string_agg(md5(x::text), '' "
              "ORDER BY x::text)), '') FROM {name} AS x")


def postgres_dir(prefix: str = "pgr-localpg-") -> Path:
    """A new directory in /tmp that the postgres user owns (pytest's own temp directories
    are root-only, and the server, psql and the restore script run as postgres)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(path, pw.pw_uid, pw.pw_gid)
    return path


def _as_postgres() -> list[str]:
    if os.geteuid() != 0:
        return []
    return ["runuser", "-u", "postgres", "--"]


class LocalPostgres:
    """One PostgreSQL 15 cluster in `root` (created by `init`, removed by `destroy`)."""

    def __init__(self, root: Path | None = None, *, conf: str = "") -> None:
        self.root = Path(root) if root else postgres_dir()
        self.data = self.root / "data"
        self.socket_dir = self.root
        self.extra_conf = conf
        self.prefix = _as_postgres()

    # ------------------------------------------------------------------ lifecycle
    def init(self) -> LocalPostgres:
        self.root.mkdir(parents=True, exist_ok=True)
        if self.prefix:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self.root.chmod(0o755)
        self._run([str(PG_BINDIR / "initdb"), "-D", str(self.data), "-U", "postgres",
                   "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"])
        with (self.data / "postgresql.conf").open("a") as f:
            f.write(_CONF + self.extra_conf + f"\nunix_socket_directories = '{self.socket_dir}'\n")
        return self

    def start(self) -> None:
        self._run([str(PG_BINDIR / "pg_ctl"), "-D", str(self.data), "-w", "-t", "120",
                   "-l", str(self.root / "server.log"), "start"])

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run([str(PG_BINDIR / "pg_ctl"), "-D", str(self.data), "-w", "-t", "120",
                       "-m", "fast", "stop"], check=False)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def snapshot(self, dest: Path) -> None:
        """Copy the stopped cluster's data directory (a fresh state to start from again)."""
        self.stop()
        shutil.rmtree(dest, ignore_errors=True)
        subprocess.run(["cp", "-a", str(self.data), str(dest)], check=True)

    def reset_to(self, snapshot: Path) -> None:
        """Replace the data directory by a snapshot and start the server on it."""
        self.stop()
        shutil.rmtree(self.data)
        subprocess.run(["cp", "-a", str(snapshot), str(self.data)], check=True)
        self.start()

    # ------------------------------------------------------------------ clients
    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "PGHOST": str(self.socket_dir), "PGUSER": "postgres",
                "PGPORT": "5432"}

    def client_argv(self, tool: str, *args: str) -> list[str]:
        """`tool` (psql, pg_dumpall, …) as the postgres user, talking to this server.

        The connection goes through `env` (PGHOST, PGUSER): `runuser` keeps the environment.
        """
        return [*self.prefix, str(PG_BINDIR / tool), *args]

    def psql(self, sql: str, database: str = "postgres", *, separator: str = "|") -> str:
        res = subprocess.run(
            self.client_argv("psql", "-X", "-q", "-A", "-t", "-F", separator,
                             "-v", "ON_ERROR_STOP=1", "-d", database),
            input=sql, env=self.env, capture_output=True, text=True, check=False, timeout=600,
        )
        if res.returncode != 0:
            raise RuntimeError(f"psql failed ({res.returncode}): {res.stderr.strip()}")
        return res.stdout

    def dumpall(self, out: Path, *args: str) -> None:
        with out.open("wb") as fh:
            subprocess.run(self.client_argv("pg_dumpall", *args), env=self.env, stdout=fh,
                           check=True, timeout=3600)

    def _run(self, argv: Sequence[str], *, check: bool = True) -> None:
        res = subprocess.run([*self.prefix, *argv], env=self.env, capture_output=True,
                             text=True, check=False, timeout=600)
        if check and res.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({res.returncode}): {res.stderr.strip()}"
                               f" {res.stdout.strip()[-2000:]}")

    # ------------------------------------------------------------------ comparisons
    def databases(self) -> list[str]:
        out = self.psql("SELECT datname FROM pg_database WHERE datallowconn ORDER BY 1")
        return [d for d in out.splitlines() if d]

    def schema(self) -> str:
        """`pg_dumpall --schema-only`, with the per-run `\\restrict` token lines dropped (the
        only part that differs between two dumps of the same cluster)."""
        res = subprocess.run(self.client_argv("pg_dumpall", "--schema-only"), env=self.env,
                             capture_output=True, text=True, check=True, timeout=1800)
        return "".join(line for line in res.stdout.splitlines(keepends=True)
                       if not line.startswith(("\\restrict ", "\\unrestrict ")))

    def checksums(self) -> dict[str, str]:
        """Every user table, materialized view, sequence and large object of every database:
        `db.schema.name` → row count and an ordered checksum (md5 over the md5 of each row's
        text, rows sorted by their text), so equal means same contents."""
        result: dict[str, str] = {}
        for db in self.databases():
            rels = self.psql(
                "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname), c.relkind "
                "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relkind IN ('r', 'm', 'S') AND n.nspname NOT IN "
                "('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' "
                "ORDER BY 1", database=db, separator="\t").splitlines()
            parts = []
            for line in filter(None, rels):
                name, kind = line.split("\t")
                lit = "'" + name.replace("'", "''") + "'"
                parts.append((_SEQUENCE_SQL if kind == "S" else _TABLE_SQL).format(
                    lit=lit, name=name))
            parts.append("SELECT 'large objects', count(*), coalesce(md5(string_agg(l::text, "
                         "'' ORDER BY l::text)), '') FROM (SELECT loid, md5(string_agg(data, "
                         "''::bytea ORDER BY pageno)) FROM pg_largeobject GROUP BY loid) AS l")
            out = self.psql("SET work_mem = '256MB';\n" + "\nUNION ALL\n".join(parts) + ";",
                            database=db, separator="\t")
            for line in filter(None, out.splitlines()):
                name, count, digest = line.split("\t")
                result[f"{db}.{name}"] = f"{count} {digest}"
        return result
