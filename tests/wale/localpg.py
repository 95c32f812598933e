"""A scratch PostgreSQL 15 on this machine (Unix socket only), run as the `postgres` OS user.

Why this exists: the WAL-E world needs a real server outside the simulated VMs twice — to
exercise the archiver and base-backup maker quickly, and to prove an archive restores with
plain PostgreSQL tools (extract, restore_command, recovery_target_time) into an empty data
directory, as the manual runbook does. It satisfies `archive.PostgresHost`.

The directory lives under /tmp (not pytest's tmp_path, whose parents are root-only and so
not traversable by `postgres`); `remove()` deletes it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from .archive import PG_BINDIR, WALCMD, ArchiveTarget, archive_command, write_envdir

_ENV = {"PATH": f"{PG_BINDIR}:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


class LocalPgError(RuntimeError):
    """A command of the scratch server failed; the message has its output and log tail."""


class LocalPostgres:
    """One scratch server: `root/data` (PGDATA), socket and log in `root`."""

    def __init__(self, root: Path | None = None, *, port: int = 5432) -> None:
        self.root = root or Path(tempfile.mkdtemp(prefix="wale-localpg-", dir="/tmp"))
        self.port = port
        account = pwd.getpwnam("postgres")
        self.uid, self.gid = account.pw_uid, account.pw_gid
        self.root.chmod(0o700)
        os.chown(self.root, self.uid, self.gid)

    # ------------------------------------------------------------------ PostgresHost
    @property
    def pgdata(self) -> str:
        return str(self.root / "data")

    @property
    def socket_dir(self) -> str:
        return str(self.root)

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    def popen_as_postgres(self, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            user=self.uid, group=self.gid, extra_groups=[], cwd=self.root, env=_ENV,
        )  # fmt: skip

    def run_as_postgres(
        self, argv: Sequence[str], *, input: str | None = None, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            list(argv), input=input, capture_output=True, text=True, timeout=timeout,
            user=self.uid, group=self.gid, extra_groups=[], cwd=self.root, env=_ENV, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise LocalPgError(
                f"{' '.join(argv[:2])} exited {proc.returncode}: {proc.stderr.strip()[-1500:]}"
                f"\n-- server log:\n{self.log_tail()}"
            )
        return proc

    def psql(self, sql: str, *, database: str = "postgres") -> str:
        proc = self.run_as_postgres(
            [f"{PG_BINDIR}/psql", "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1",
             "-h", self.socket_dir, "-p", str(self.port), "-U", "postgres", "-d", database,
             "-f", "-"],
            input=sql,
        )  # fmt: skip
        return proc.stdout.rstrip("\n")

    # ------------------------------------------------------------------ lifecycle
    def initdb(self) -> None:
        self.run_as_postgres(
            [f"{PG_BINDIR}/initdb", "-D", self.pgdata, "-U", "postgres", "-E", "UTF8",
             "--locale=C.UTF-8", "--auth-local=trust", "--auth-host=reject", "-N"]
        )  # fmt: skip
        self.set_config({})

    def set_config(self, settings: dict[str, str]) -> None:
        """Write `postgresql.conf` from scratch: socket-only basics plus `settings` (values
        are written as quoted strings). A restore starts without any config file (WAL-E
        leaves them out), so this is also how a restored data directory gets one."""
        base = {
            "listen_addresses": "",
            "port": str(self.port),
            "unix_socket_directories": self.socket_dir,
            "shared_buffers": "16MB",
            # Recovery refuses settings below the source's (the a9s job has 60 and 10).
            "max_connections": "100",
            "max_wal_senders": "10",
            "fsync": "off",
            "wal_level": "replica",
            "log_line_prefix": "%m [%p] ",
        }
        base.update(settings)
        lines = [f"{k} = '{v.replace(chr(39), chr(39) * 2)}'" for k, v in base.items()]
        conf = Path(self.pgdata) / "postgresql.conf"
        conf.write_text("\n".join(lines) + "\n")
        os.chown(conf, self.uid, self.gid)
        for name, text in (
            ("pg_hba.conf", "local all all trust\nlocal replication all trust\n"),
            ("pg_ident.conf", ""),
        ):
            path = Path(self.pgdata) / name
            path.write_text(text)
            os.chown(path, self.uid, self.gid)

    @property
    def envdir(self) -> Path:
        return self.root / "wal-e.d" / "env"

    def archive_settings(self, target: ArchiveTarget) -> dict[str, str]:
        """Write the envdir for `target` and return the settings that archive into it."""
        write_envdir(self.envdir, target, uid=self.uid, gid=self.gid)
        return {
            "archive_mode": "on",
            "archive_command": archive_command(str(WALCMD), str(self.envdir)),
        }

    def start(self, *, wait: bool = True, timeout: int = 120) -> None:
        argv = [f"{PG_BINDIR}/pg_ctl", "-D", self.pgdata, "-l", str(self.log_path)]
        argv += ["-w", "-t", str(timeout)] if wait else ["-W"]
        self.run_as_postgres([*argv, "start"], timeout=timeout + 30)

    def stop(self) -> None:
        if (Path(self.pgdata) / "postmaster.pid").exists():
            subprocess.run(
                [f"{PG_BINDIR}/pg_ctl", "-D", self.pgdata, "-m", "immediate", "-w", "stop"],
                user=self.uid, group=self.gid, extra_groups=[], cwd=self.root, env=_ENV,
                capture_output=True, check=False, timeout=60,
            )  # fmt: skip

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def running(self) -> bool:
        """A postmaster owns the data directory (its PID file names a live process)."""
        try:
            pid = int((Path(self.pgdata) / "postmaster.pid").read_text().split("\n", 1)[0])
            os.kill(pid, 0)
        except (OSError, ValueError):
            return False
        return True

    def wait_until(self, sql: str, expected: str, *, timeout: float = 120.0) -> None:
        """Poll `sql` until it prints `expected` (e.g. recovery finished); fails at once when
        the server has stopped (a recovery that hit a FATAL error)."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not self.running:
                raise LocalPgError(f"server stopped while waiting for {sql!r}\n{self.log_tail()}")
            try:
                last = self.psql(sql)
                if last == expected:
                    return
            except LocalPgError as exc:
                last = str(exc)
            time.sleep(0.3)
        raise LocalPgError(f"{sql!r} gave {last!r}, not {expected!r}\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
