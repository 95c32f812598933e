"""Sort the errors psql prints while restoring a pg_dumpall script into expected and not.

Why this module exists: `psql < dump` exits 0 although it prints errors (formats.md, verified),
and restoring into a running a9s-pg cluster *always* prints some: the roles, databases,
schemas and extensions the cluster already has, the old site's `repmgr` rows colliding with
the current ones, and `\\restrict` lines that older psql clients do not know. Those are counted
and reported; any other error means data may be missing, so the restore fails with the first
such lines (CloudNativePG's "SQLSTATEs mapped to expected errors", by message here because psql
prints no SQLSTATE by default).

The restore runs `psql -f <dump>` (not `< dump`) so that every message carries the dump's
line number: `psql:/path/x.dump:123: ERROR:  …`. With the line numbers of the dump's
`\\connect` lines (a cheap `grep -n` on the VM) each error is attributed to its database, which
makes "duplicate key in the repmgr tables" precise: the same error in an application database
is data that was not restored, and is not expected.
"""

from __future__ import annotations

import bisect
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

REPMGR_DATABASE = "repmgr_cluster"
# `grep -n -e … -e …` patterns for the dump lines `ConnectMap` reads.
GREP_PATTERNS = ("^\\\\connect ", "^DROP DATABASE ", "^CREATE DATABASE ", "^DROP ROLE ",
                 "^CREATE ROLE ")
REPMGR_TABLES = frozenset({"nodes", "events", "monitoring_history", "voting_term"})

# How many unexpected errors are kept verbatim for the failure message and status.
MAX_UNEXPECTED_KEPT = 20

_MESSAGE = re.compile(
    r"^(?:psql:(?P<file>.*?):(?P<line>\d+): )?(?P<level>ERROR|FATAL|PANIC|error|fatal):\s+"
    r"(?P<text>.*)$"
)
_CONTINUATION = re.compile(r"^(?:DETAIL|HINT|CONTEXT|LINE \d+|QUERY|STATEMENT):\s")
_CONNECT = re.compile(r"^(?P<line>\d+):\\connect\s+(?P<args>.*)$")
_DDL = re.compile(r'^\d+:(?P<verb>DROP|CREATE) (?P<kind>DATABASE|ROLE) (?:IF EXISTS )?'
                  r'(?P<name>"(?:[^"]|"")+"|[^\s;"]+)')

_EXPECTED: list[tuple[str, re.Pattern[str]]] = [
    ("role already exists", re.compile(r'^role ".*" already exists$')),
    ("database already exists", re.compile(r'^database ".*" already exists$')),
    ("schema already exists", re.compile(r'^schema ".*" already exists$')),
    ("extension already exists", re.compile(r'^extension ".*" already exists$')),
    ("relation already exists", re.compile(r'^relation ".*" already exists$')),
    ("\\restrict unknown to psql", re.compile(r"^invalid command \\(?:un)?restrict\b")),
    # Dumps made with `pg_dumpall --clean` drop every role and database first; the role psql
    # runs as and the database it is connected to cannot be dropped, and are kept.
    ("current user cannot be dropped", re.compile(r"^current user cannot be dropped$")),
    ("open database cannot be dropped",
     re.compile(r"^cannot drop the currently open database$")),
]
# A database the dump drops and creates again (`--clean`; without `--if-exists` for all of
# them, with it still for postgres and template1) may be gone already: a power cut between a
# restore's `DROP DATABASE template1;` and its `CREATE DATABASE template1` leaves none, and the
# next run's drop then fails. The CREATE that follows makes it again, so the error is harmless
# *for those databases*. A `\connect` to a missing database prints another message
# (`\connect: connection to server … failed`), and a CREATE that fails is an error of its own.
# The same for roles: `pg_dumpall --clean` without `--if-exists` writes `DROP ROLE x;`, which
# fails on a cluster without x, and its `CREATE ROLE x` follows. (A later "role x does not
# exist" of an ALTER or GRANT would mean its CREATE ROLE failed: an error of its own.)
_GONE = re.compile(r'^(?P<kind>database|role) "(?P<name>.*)" does not exist$')
_GONE_KINDS = {"database": "database the dump drops was already gone",
               "role": "role the dump drops was already gone"}
_DUPLICATE_KEY = re.compile(r'^duplicate key value violates unique constraint "(?P<c>[^"]+)"$')
_COPY_CONTEXT = re.compile(r"^CONTEXT:\s+COPY (?:(?P<schema>\w+)\.)?(?P<table>\w+),")


@dataclass(frozen=True)
class PsqlMessage:
    text: str
    level: str
    line: int | None
    database: str | None
    context: tuple[str, ...] = ()

    def describe(self) -> str:
        where = []
        if self.database:
            where.append(f"database {self.database}")
        if self.line is not None:
            where.append(f"dump line {self.line}")
        suffix = f" ({', '.join(where)})" if where else ""
        return f"{self.level.upper()}: {self.text}{suffix}"


@dataclass
class RestoreReport:
    expected: Counter[str] = field(default_factory=Counter)
    unexpected: list[PsqlMessage] = field(default_factory=list)
    unexpected_count: int = 0

    @property
    def ok(self) -> bool:
        return self.unexpected_count == 0

    def summary(self) -> str:
        # The unexpected errors come first: messages and status fields are cut to a length,
        # and the errors that failed the restore are the part a reader must not lose.
        parts = [f"{n} x {kind}" for kind, n in sorted(self.expected.items())]
        expected = "expected errors: " + (", ".join(parts) if parts else "none")
        if not self.unexpected_count:
            return expected
        first = "; ".join(m.describe() for m in self.unexpected[:5])
        return f"{self.unexpected_count} unexpected error(s), first: {first}; {expected}"


@dataclass(frozen=True)
class Recreated:
    """What the dump drops and then creates again: for these a "does not exist" from the
    dump's own DROP is harmless (`_GONE`)."""

    databases: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()

    def __or__(self, other: Recreated) -> Recreated:
        return Recreated(self.databases | other.databases, self.roles | other.roles)

    def has(self, kind: str, name: str) -> bool:
        return name in (self.databases if kind == "database" else self.roles)


NOTHING_RECREATED = Recreated()


# PostgreSQL folds unquoted identifiers to lower case in ASCII only (`downcase_identifier`, for
# multi-byte encodings such as UTF-8); pg_dump leaves names with non-ASCII letters unquoted.
_ASCII_FOLD = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def ddl_name(raw: str) -> str:
    """An object name as pg_dump writes it after DROP/CREATE: quoted, or folded as the server
    folds it. The serial restore's error check and the dump index use this one reading."""
    return raw[1:-1].replace('""', '"') if raw.startswith('"') else raw.translate(_ASCII_FOLD)


class ConnectMap:
    """Which database a dump line belongs to, from `grep -n` output of the dump's `\\connect`
    lines (`GREP_PATTERNS`), and which databases it drops and creates again."""

    def __init__(self, grep_output: str = "", *, initial: str = "postgres",
                 recreated: Recreated = NOTHING_RECREATED) -> None:
        self._lines: list[int] = []
        self._dbs: list[str] = []
        self._initial = initial
        seen: dict[tuple[str, str], set[str]] = {}
        for raw in grep_output.splitlines():
            ddl = _DDL.match(raw.strip())
            if ddl:
                seen.setdefault((ddl.group("kind"), ddl.group("verb")), set()).add(
                    ddl_name(ddl.group("name")))
            m = _CONNECT.match(raw.strip())
            if not m:
                continue
            db = parse_connect_target(m.group("args"))
            if db is not None:
                self._lines.append(int(m.group("line")))
                self._dbs.append(db)

        def both(kind: str) -> frozenset[str]:
            return frozenset(seen.get((kind, "DROP"), set()) & seen.get((kind, "CREATE"), set()))

        self.recreated = recreated | Recreated(both("DATABASE"), both("ROLE"))

    def database_at(self, line: int | None) -> str | None:
        if line is None:
            return None
        idx = bisect.bisect_left(self._lines, line) - 1
        return self._dbs[idx] if idx >= 0 else self._initial


def parse_connect_target(args: str) -> str | None:
    """The database of a `\\connect` line as pg_dumpall writes it.

    Either a plain name (`\\connect repmgr_cluster`), a quoted one (`\\connect "my db"`), or
    `-reuse-previous=on "dbname='my db'"`.
    """
    args = args.strip()
    m = re.search(r"dbname='((?:[^'\\]|\\.|'')*)'", args)
    if m:
        return m.group(1).replace("''", "'").replace("\\'", "'")
    if args.startswith('"') and args.endswith('"') and len(args) >= 2:
        return args[1:-1].replace('""', '"')
    token = args.split()[0] if args.split() else ""
    return token if token and not token.startswith("-") else None


def parse_messages(
    lines: Iterable[str], connects: ConnectMap | None = None
) -> Iterable[PsqlMessage]:
    """Group psql output lines into error messages with their DETAIL/CONTEXT lines."""
    connects = connects or ConnectMap()
    current: PsqlMessage | None = None
    context: list[str] = []
    for raw in lines:
        line = raw.rstrip("\n")
        m = _MESSAGE.match(line)
        if m:
            if current is not None:
                yield _with_context(current, context)
            lineno = int(m.group("line")) if m.group("line") else None
            current = PsqlMessage(
                text=m.group("text").strip(),
                level=m.group("level").lower(),
                line=lineno,
                database=connects.database_at(lineno),
            )
            context = []
        elif current is not None and _CONTINUATION.match(line):
            context.append(line)
        elif current is not None and not line.startswith("psql:"):
            # A multi-line message text (rare) or unrelated output: keep it with the message.
            context.append(line)
        else:
            if current is not None:
                yield _with_context(current, context)
            current, context = None, []
    if current is not None:
        yield _with_context(current, context)


def _with_context(message: PsqlMessage, context: list[str]) -> PsqlMessage:
    return PsqlMessage(message.text, message.level, message.line, message.database,
                       tuple(context))


def classify(message: PsqlMessage, recreated: Recreated = NOTHING_RECREATED) -> str | None:
    """The expected-error kind of a message, or None when it is not expected."""
    for kind, pattern in _EXPECTED:
        if pattern.search(message.text):
            return kind
    gone = _GONE.match(message.text)
    if gone and recreated.has(gone.group("kind"), gone.group("name")):
        return _GONE_KINDS[gone.group("kind")]
    if _DUPLICATE_KEY.match(message.text):
        table = None
        schema = None
        for ctx in message.context:
            cm = _COPY_CONTEXT.match(ctx)
            if cm:
                table, schema = cm.group("table"), cm.group("schema")
        in_repmgr_db = message.database == REPMGR_DATABASE or (
            message.database is None and schema in (None, "repmgr")
        )
        if in_repmgr_db and table in REPMGR_TABLES and schema in (None, "repmgr"):
            return "duplicate key in repmgr tables"
    return None


def classify_output(lines: Iterable[str], connects: ConnectMap | None = None) -> RestoreReport:
    connects = connects or ConnectMap()
    report = RestoreReport()
    for message in parse_messages(lines, connects):
        kind = classify(message, connects.recreated)
        if kind is not None:
            report.expected[kind] += 1
            continue
        report.unexpected_count += 1
        if len(report.unexpected) < MAX_UNEXPECTED_KEPT:
            report.unexpected.append(message)
    return report
