"""Byte-offset index of a plain `pg_dumpall` script, built while the dump streams by.

Why this module exists: the parallel restore (`restore_script`) feeds psql byte ranges of the
staged dump instead of the whole file, so it needs to know where each part is: the globals,
and per database the `\\connect` line, the pg_dump preamble, pre-data, each table's COPY block,
the sequence sets and the post-data entries by kind. pg_dump marks every entry with a comment
header (`-- Name: x; Type: INDEX; Schema: s; Owner: o`, `-- Data for Name: …`), so one pass
over the text finds them. The pass runs inside the decrypt stream (~600 MB/s), so it must cost
next to nothing where the bytes are: inside a COPY block it only looks for the `\\.`
terminator line with `bytes.find` (and, every `SPLIT_EVERY` bytes, for one row end, so a huge
table can be loaded by several connections). Outside COPY blocks it reads line by line and
tracks SQL quoting (`'…'`, `E'…'`, `"…"`, `$tag$…$tag$`, comments), so that text inside a
function body or a string that looks like a header, a `COPY` or a `\\connect` is not taken
for one. COPY data cannot confuse it either: a data row is never read as a line.

The indexer is incremental (`feed(chunk)` / `finish()`) and gives the same index whatever the
chunk sizes (a unit test splits the same dump at many sizes, down to 1 byte).

Each COPY block's rows are counted as they pass (`bytes.count(b"\\n")` over the data: in
pg_dump's text COPY format a row is exactly one line, a newline inside a value is written
`\\n`), so the restore proof (`cluster.restore_proof`) knows how many rows each table must hold
after the restore without another pass over the dump.

Whatever it does not fully understand is not guessed at: a database whose section holds large
objects, an unknown psql meta-command, a `\\connect` to another database, data entries that are
not contiguous, statements between entries that are not session settings, … is marked
`fallback` with a reason, and the restore runs psql serially over that database's bytes. If
the dump's overall shape is not pg_dumpall's (no database sections, an unterminated COPY, a
quote left open), the whole dump falls back to one serial psql.

`DumpIndex` is JSON-serializable (versioned) so the operator can compute it while the dump
streams to the primary and store it next to the dump for resumes.
"""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pgrecovery.cluster.restore_errors import ddl_name, parse_connect_target

INDEX_VERSION = 2
# Version 1 (before row counts) is still read, with `Entry.rows` None: an upgrade of the operator
# in the middle of a recovery restores as before, and the restore proof says the rows were not
# counted instead of failing the restore.
_READABLE_VERSIONS = frozenset({1, INDEX_VERSION})

# A row boundary is recorded inside a COPY block at least this many bytes apart, so a table
# larger than a few of these can be loaded in slices by several connections at once. One
# `find` per 16 MiB costs nothing; the generator decides how many slices are worth a session.
SPLIT_EVERY = 16 * 1024 * 1024

# Entry types (pg_dump's TocEntry `desc`) the restore treats specially.
DATA_TYPES = frozenset({"TABLE DATA", "SEQUENCE SET"})
LARGE_OBJECT_TYPES = frozenset({"BLOB", "BLOBS", "LARGE OBJECT", "BLOB METADATA"})
# Index-backed work that only reads its table and can run concurrently after the data
# (pg_restore does the same): CREATE INDEX, ADD CONSTRAINT PRIMARY KEY / UNIQUE / EXCLUDE.
PARALLEL_POST_TYPES = frozenset({"INDEX", "CONSTRAINT"})
# May follow an index or constraint without being something a later index depends on.
TRANSPARENT_POST_TYPES = frozenset({"COMMENT", "SECURITY LABEL"})

Range = tuple[int, int]
"""[start, end) byte offsets in the dump."""

_HEADER = re.compile(
    rb"^-- (?P<data>Data for )?Name: (?P<name>.*); Type: (?P<type>[A-Z][A-Z ]*); "
    rb"Schema: (?P<schema>.*); Owner: (?P<owner>.*)$"
)
_DB_HEADER = re.compile(rb'^-- Database "(?P<name>.*)" dump$')
_COPY = re.compile(rb"^COPY (?P<table>.+?) (?:\(.*\) )?FROM stdin;$")
_SESSION = re.compile(
    rb"^(?:(?:RE)?SET\s+(?P<set>SESSION\s+AUTHORIZATION|ROLE|[A-Za-z_][A-Za-z0-9_.]*)"
    rb"|SELECT pg_catalog\.set_config\('(?P<cfg>[a-z_.]+)')"
)
_META = re.compile(rb"^\\(?P<cmd>[a-z]+)(?:\s|$)")
# What the SQL of an entry run in the parallel index phase must look like: its header says
# INDEX or CONSTRAINT, but a header is a comment built from names (a schema or role name can
# hold "; Type: INDEX"), so the statements themselves are checked too. Anything else in the
# entry demotes it to the serial part.
_INDEX_SQL = re.compile(rb"^CREATE (?:UNIQUE )?INDEX \S+ ON (?:ONLY )?(?P<t>\S+) USING ")
_CONSTRAINT_SQL = re.compile(rb"^ALTER TABLE (?:ONLY )?(?P<t>\S+)\s+ADD CONSTRAINT \S+ "
                             rb"(?:PRIMARY KEY|UNIQUE|EXCLUDE)\b")
_INDEX_EXTRA_SQL = re.compile(rb"^ALTER (?:TABLE|INDEX) (?:ONLY )?\S+\s+(?:CLUSTER ON \S+;"
                              rb"|REPLICA IDENTITY USING INDEX \S+;"
                              rb"|ALTER COLUMN \d+ SET STATISTICS \d+;)$")
_HEAD_BYTES = 1024
_DATABASE_DDL = re.compile(rb'^(?P<verb>DROP|CREATE) DATABASE (?:IF EXISTS )?'
                           rb'(?P<name>"(?:[^"]|"")+"|[^\s;"]+)')
_ROLE_DDL = re.compile(rb'^(?P<verb>DROP|CREATE) ROLE (?:IF EXISTS )?'
                       rb'(?P<name>"(?:[^"]|"")+"|[^\s;"]+)')
_DOLLAR = re.compile(rb"\$(?:[A-Za-z_\x80-\xff][A-Za-z0-9_\x80-\xff]*)?\$")
_TOKEN = re.compile(rb"""[Ee]'|'|"|\$(?:[A-Za-z_\x80-\xff][A-Za-z0-9_\x80-\xff]*)?\$|--|/\*|;""")
_IDENT_CHAR = re.compile(rb"[A-Za-z0-9_$\x80-\xff]")


@dataclass
class Entry:
    """One pg_dump TOC entry: header comment through its last statement."""

    type: str
    name: str
    schema: str
    start: int
    end: int
    table: str | None = None
    """The table it loads or builds on, when the text says so (`schema.table`)."""
    state: list[Range] = field(default_factory=list)
    """Session settings in effect at the entry (`SET default_tablespace = …` and the like)."""
    copy: Range | None = None
    """COPY only: the rows (after the `COPY … FROM stdin;` line, before `\\.`)."""
    header_end: int = 0
    """COPY only: end of the `COPY … FROM stdin;` line."""
    splits: list[int] = field(default_factory=list)
    """COPY only: offsets just after a row end, about `SPLIT_EVERY` apart."""
    verified: bool = True
    """INDEX / CONSTRAINT only: its statements look like what the type says."""
    rows: int | None = None
    """COPY only: the rows the block carries (None: an index of version 1 did not count)."""

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass
class DatabaseIndex:
    """One database's section of the pg_dumpall script."""

    name: str
    start: int
    end: int = 0
    connect: Range = (0, 0)
    """The first `\\connect` line: everything before it (CREATE DATABASE …) runs in phase A."""
    preamble: Range = (0, 0)
    """After `connect` up to the first entry: `\\restrict`, `SET statement_timeout`, …"""
    pre: Range = (0, 0)
    data: list[Entry] = field(default_factory=list)
    post_parallel: list[Entry] = field(default_factory=list)
    post_serial: list[Range] = field(default_factory=list)
    """Post-data in dump order minus `post_parallel` (FKs, triggers, ACLs, comments, …)."""
    post_kinds: dict[str, int] = field(default_factory=dict)
    """How many post-data entries of each type (for reports)."""
    fallback: str | None = None
    created: bool = False
    """The section creates the database (`CREATE DATABASE` before its `\\connect`)."""
    dropped: bool = False
    """The dump drops the database before creating or filling it (`pg_dumpall --clean`)."""
    entries: int = 0
    """pg_dump entries in the section: 0 = nothing is restored into the database."""
    tables: list[tuple[str, str]] = field(default_factory=list)
    """(schema, name) of each `TABLE` entry in pre-data, as its header comment names it: the
    tables this section creates (not an extension's). Empty in an index of an older build."""

    @property
    def serial_range(self) -> Range:
        """What one serial psql runs for this database (from its `\\connect` on)."""
        return (self.connect[0], self.end)


@dataclass
class DumpIndex:
    size: int
    globals: Range
    databases: list[DatabaseIndex]
    fallback: str | None = None
    """Set when the dump as a whole must be restored by one serial psql."""
    version: int = INDEX_VERSION
    recreated_roles: list[str] = field(default_factory=list)
    """Roles the globals drop and create again (`pg_dumpall --clean`): a "does not exist"
    of such a DROP is harmless (`restore_errors.Recreated`). Absent from older indexes."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> DumpIndex:
        raw = json.loads(text)
        if not isinstance(raw, dict) or raw.get("version") not in _READABLE_VERSIONS:
            raise ValueError(f"unsupported dump index version {raw.get('version')!r}"
                             if isinstance(raw, dict) else "dump index is not an object")
        dbs = [_db_from(d) for d in raw["databases"]]
        return cls(size=int(raw["size"]), globals=_range(raw["globals"]), databases=dbs,
                   fallback=raw.get("fallback"), version=int(raw["version"]),
                   recreated_roles=[str(r) for r in raw.get("recreated_roles", [])])

    @property
    def fallbacks(self) -> dict[str, str]:
        """database → why it is restored serially."""
        return {d.name: d.fallback for d in self.databases if d.fallback}


def _range(value: Any) -> Range:
    a, b = value
    return (int(a), int(b))


def _entry_from(raw: dict[str, Any]) -> Entry:
    return Entry(
        type=str(raw["type"]), name=str(raw["name"]), schema=str(raw["schema"]),
        start=int(raw["start"]), end=int(raw["end"]), table=raw.get("table"),
        state=[_range(r) for r in raw.get("state", [])],
        copy=_range(raw["copy"]) if raw.get("copy") else None,
        header_end=int(raw.get("header_end", 0)),
        splits=[int(x) for x in raw.get("splits", [])],
        verified=bool(raw.get("verified", True)),
        rows=int(raw["rows"]) if raw.get("rows") is not None else None,
    )


def _db_from(raw: dict[str, Any]) -> DatabaseIndex:
    return DatabaseIndex(
        name=str(raw["name"]), start=int(raw["start"]), end=int(raw["end"]),
        connect=_range(raw["connect"]), preamble=_range(raw["preamble"]),
        pre=_range(raw["pre"]), data=[_entry_from(e) for e in raw["data"]],
        post_parallel=[_entry_from(e) for e in raw["post_parallel"]],
        post_serial=[_range(r) for r in raw["post_serial"]],
        post_kinds={str(k): int(v) for k, v in raw.get("post_kinds", {}).items()},
        fallback=raw.get("fallback"),
        created=bool(raw.get("created", False)), dropped=bool(raw.get("dropped", False)),
        entries=int(raw.get("entries", 0)),
        tables=[(str(t[0]), str(t[1])) for t in raw.get("tables", [])],
    )


# ------------------------------------------------------------------------------ indexer


@dataclass
class _Db:
    """A database section while it is being read."""

    index: DatabaseIndex
    connect_line: bytes | None = None
    preamble_done: bool = False
    entries: list[Entry] = field(default_factory=list)
    between: list[tuple[str, int]] = field(default_factory=list)
    """Things outside entries after the preamble: ('session'|'meta'|'other', offset)."""
    state: dict[bytes, Range] = field(default_factory=dict)
    content_end: int | None = None


class DumpIndexer:
    """Feed the dump in chunks of any size; `finish()` returns the `DumpIndex`."""

    def __init__(self) -> None:
        self._pos = 0  # absolute offset of the first byte not yet consumed
        self._buf = b""  # incomplete line (text mode)
        self._copy: Entry | None = None  # the entry whose COPY rows are being skipped
        self._tail = b""  # last bytes of COPY data seen (terminator across chunks)
        self._next_split = 0
        # SQL lexer state across lines: None, "'", "E'", '"' or a dollar tag; comment depth.
        self._quote: bytes | str | None = None
        self._comment_depth = 0
        self._in_stmt = False
        self._stmt_start = 0
        self._first_line = b""  # first line of the statement being read
        self._head = b""  # its first _HEAD_BYTES bytes
        self._entry_stmts = 0  # statements of the current entry so far
        self._prev: tuple[int, bytes] = (0, b"")  # previous line's offset and text
        self._globals_end: int | None = None
        self._dbs: list[_Db] = []
        self._entry: Entry | None = None
        self._fatal: str | None = None
        self._trailer = False  # after "-- PostgreSQL database cluster dump complete"
        self._encoding_at: int | None = None  # offset of an `\\encoding` line just read
        self._dropped: set[str] = set()  # databases the dump drops (`pg_dumpall --clean`)
        self._roles: dict[str, set[str]] = {"DROP": set(), "CREATE": set()}  # in the globals

    # ------------------------------------------------------------------ feeding

    def feed(self, chunk: bytes) -> None:
        chunk = bytes(chunk)
        offset = 0
        n = len(chunk)
        while offset < n:
            if self._copy is not None:
                offset = self._feed_copy(chunk, offset)
            else:
                offset = self._feed_text(chunk, offset)

    def _feed_copy(self, chunk: bytes, offset: int) -> int:
        """Skip COPY rows up to the `\\.` line; returns where text resumes in `chunk`."""
        entry = self._copy
        assert entry is not None  # noqa: S101 - callers check
        base = self._pos - offset  # absolute offset of chunk[0]
        n = len(chunk)
        found = -1  # absolute offset of the newline that precedes `\\.`
        if self._tail:
            edge = self._tail + chunk[offset: offset + 3]
            i = edge.find(b"\n\\.\n")
            if i >= 0:
                found = self._pos - len(self._tail) + i
        if found < 0:
            i = chunk.find(b"\n\\.\n", offset)
            if i >= 0:
                found = base + i
        limit = n if found < 0 else min(n, found - base + 1)
        # Every newline up to and including the one before `\.` ends a row. When the
        # terminator began in an earlier chunk, `limit` is before `offset`, even negative
        # (which `count` would read from the end): nothing to count here.
        if limit > offset:
            entry.rows = (entry.rows or 0) + chunk.count(b"\n", offset, limit)
        # A row end every SPLIT_EVERY bytes, looked for only where the chunk passes the target.
        while base + limit > self._next_split:
            nl = chunk.find(b"\n", max(self._next_split - base, offset), limit)
            if nl < 0:
                break
            entry.splits.append(base + nl + 1)
            self._next_split = base + nl + 1 + SPLIT_EVERY
        if found < 0:
            self._tail = (self._tail + chunk[offset:])[-3:]
            self._pos = base + n
            return n
        rows_end = found + 1
        end = rows_end + 3
        entry.copy = (entry.header_end, rows_end)
        entry.splits = [s for s in entry.splits if entry.header_end < s < rows_end]
        entry.end = end
        self._copy = None
        self._tail = b""
        self._pos = end
        self._prev = (rows_end, b"\\.")
        return end - base

    def _feed_text(self, chunk: bytes, offset: int) -> int:
        base = self._pos - offset
        n = len(chunk)
        while offset < n and self._copy is None:
            nl = chunk.find(b"\n", offset)
            if nl < 0:
                self._buf += chunk[offset:]
                self._pos = base + n
                return n
            if self._buf:
                line = self._buf + chunk[offset:nl]
                start = base + offset - len(self._buf)
                self._buf = b""
            else:
                line = chunk[offset:nl]
                start = base + offset
            offset = nl + 1
            self._pos = base + offset
            self._line(start, line)
        return offset

    def finish(self) -> DumpIndex:
        if self._buf and self._copy is None:
            start = self._pos - len(self._buf)
            line, self._buf = self._buf, b""
            self._line(start, line)
        size = self._pos
        if self._copy is not None:
            self._fatal = self._fatal or (
                f"COPY block of {self._copy.table or self._copy.name} has no \\. terminator "
                "(truncated dump?)")
        elif self._quote is not None or self._comment_depth:
            self._fatal = self._fatal or "the dump ends inside a quoted string or comment"
        if not self._dbs and not self._fatal:
            self._fatal = "no pg_dumpall database sections found"
        self._close_db(size)
        globals_end = self._globals_end if self._globals_end is not None else size
        dbs = [d.index for d in self._dbs]
        for db in dbs:
            db.dropped = db.name in self._dropped
        recreated_roles = sorted(self._roles["DROP"] & self._roles["CREATE"])
        return DumpIndex(size=size, globals=(0, globals_end), databases=dbs, fallback=self._fatal,
                         recreated_roles=recreated_roles)

    # ------------------------------------------------------------------ lines

    def _line(self, start: int, line: bytes) -> None:
        end = start + len(line) + 1
        if self._encoding_at is not None and not line.startswith(b"\\connect"):
            self._encoding_at = None
        prev_start, prev = self._prev
        self._prev = (start, line)
        if self._quote is not None or self._comment_depth or self._in_stmt:
            if len(self._head) < _HEAD_BYTES:
                self._head = (self._head + b"\n" + line)[:_HEAD_BYTES]
            self._lex(line, start)
        elif not line.strip():
            # Blank lines after an entry belong to it: neighbouring entries then form one
            # range (one `dd`) when a task restores them together.
            entry = self._entry
            if entry is not None and entry.end == start and self._copy is None:
                entry.end = end
            return
        elif line.startswith(b"--"):
            if prev == b"--" and line.startswith(b"-- "):
                self._comment_header(prev_start, line)
            return
        elif self._trailer:
            # Nothing restores what follows the end of the cluster dump: refuse to guess.
            self._fatal = self._fatal or "text after the end of the cluster dump"
        elif line.startswith(b"\\"):
            self._meta(start, end, line)
            return
        else:
            self._first_line = line
            self._head = line[:_HEAD_BYTES]
            self._stmt_start = start
            if line.startswith((b"DROP DATABASE ", b"CREATE DATABASE ")):
                self._database_ddl(line)
            elif line.startswith((b"DROP ROLE ", b"CREATE ROLE ")) and not self._dbs \
                    and not self._in_stmt:
                self._role_ddl(line)
            self._statement_start(start, line)
            self._lex(line, start)
        if self._copy is None and not self._in_stmt and self._quote is None \
                and not self._comment_depth:
            self._statement_done(end)

    def _comment_header(self, start: int, line: bytes) -> None:
        db = self._dbs[-1] if self._dbs else None
        m = _DB_HEADER.match(line)
        if m:
            if self._globals_end is None:
                self._globals_end = start
            self._close_db(start)
            self._dbs.append(_Db(DatabaseIndex(name=m.group("name").decode("utf-8", "replace"),
                                               start=start)))
            self._entry = None
            return
        if db is None or db.index.end:
            return
        if line.startswith(b"-- PostgreSQL database dump complete"):
            self._end_entry(start)
            if db.content_end is None:
                db.content_end = start
            return
        if line.startswith(b"-- PostgreSQL database cluster dump complete"):
            self._end_entry(start)
            self._close_db(start)
            self._trailer = True
            return
        h = _HEADER.match(line)
        if h is None or db.connect_line is None:
            return
        self._end_entry(start)
        db.preamble_done = True
        if db.index.preamble[1] == db.index.preamble[0]:
            db.index.preamble = (db.index.connect[1], start)
        entry = Entry(
            type=h.group("type").decode(), name=h.group("name").decode("utf-8", "replace"),
            schema=h.group("schema").decode("utf-8", "replace"), start=start, end=start,
            state=sorted(db.state.values()),
        )
        if entry.type in LARGE_OBJECT_TYPES:
            self._db_fallback("large objects (pg_dump BLOB entries) are restored serially")
        db.entries.append(entry)
        self._entry = entry
        self._entry_stmts = 0

    def _meta(self, start: int, end: int, line: bytes) -> None:
        m = _META.match(line)
        cmd = m.group("cmd") if m else b""
        db = self._dbs[-1] if self._dbs else None
        if cmd not in (b"connect", b"restrict", b"unrestrict", b"encoding"):
            reason = f"unknown psql meta-command {line[:40]!r}"
            if db is None or db.connect_line is None:
                self._fatal = self._fatal or reason
            else:
                self._db_fallback(reason)
            return
        if db is None or db.index.end:
            return  # globals: \\restrict / \\unrestrict around the roles
        if cmd == b"encoding":
            self._encoding_at = start
        if cmd == b"connect":
            if db.connect_line is None:
                db.connect_line = line.strip()
                # pg_dump writes `\\encoding SQL_ASCII` right before a `\\connect` whose name
                # needs the connection-string form: the pair is the connect prefix.
                enc = self._encoding_at
                db.index.connect = (enc if enc is not None else start, end)
                db.index.preamble = (end, end)
                name = _connect_target(line)
                if name:
                    db.index.name = name
                return
            if line.strip() != db.connect_line:
                self._db_fallback("\\connect to another database inside a database section")
            db.state = {}
        if cmd != b"encoding":
            self._encoding_at = None
        if db.preamble_done:
            self._end_entry(start)
            db.between.append(("meta", start))

    def _database_ddl(self, line: bytes) -> None:
        """`DROP DATABASE` in the globals (`--clean`) or before a section's `\\connect`
        (`--clean` for postgres and template1), `CREATE DATABASE` before a `\\connect`: what
        the dump drops and creates, so a restore over existing databases is decided before
        anything changes (`cluster.existing_databases`)."""
        db = self._dbs[-1] if self._dbs else None
        if db is not None and (db.connect_line is not None or db.index.end):
            return  # pg_dump writes neither inside a database's content
        m = _DATABASE_DDL.match(line)
        if m is None:
            return
        raw = m.group("name")
        name = (raw[1:-1].replace(b'""', b'"') if raw.startswith(b'"') else raw.lower()).decode(
            "utf-8", "replace")
        if m.group("verb") == b"DROP":
            self._dropped.add(name)
        elif db is not None:
            db.index.created = True

    def _role_ddl(self, line: bytes) -> None:
        """`DROP ROLE` / `CREATE ROLE` starting a statement in the globals."""
        m = _ROLE_DDL.match(line)
        if m is not None:
            name = ddl_name(m.group("name").decode("utf-8", "replace"))
            self._roles[m.group("verb").decode()].add(name)

    def _statement_start(self, start: int, line: bytes) -> None:
        db = self._dbs[-1] if self._dbs else None
        if db is None or db.connect_line is None or db.index.end:
            return
        session = _SESSION.match(line) is not None
        if not db.preamble_done:
            if session:
                return
            # The preamble is replayed before every task: it ends at the first statement
            # that is not a session setting.
            db.preamble_done = True
            db.index.preamble = (db.index.connect[1], start)
        if session:
            self._end_entry(start)
            db.between.append(("session", start))
        elif self._entry is None:
            db.between.append(("other", start))

    def _statement_done(self, end: int) -> None:
        """A statement ended at the end of this line."""
        db = self._dbs[-1] if self._dbs else None
        if db is None or db.connect_line is None or not db.preamble_done or db.index.end:
            return
        first = self._first_line
        m = _SESSION.match(first)
        if m and self._entry is None:
            key = re.sub(rb"\s+", b" ", (m.group("set") or m.group("cfg") or b"").upper())
            db.state[key] = (self._stmt_start, end)
            return
        entry = self._entry
        if entry is None:
            return
        entry.end = end
        self._entry_stmts += 1
        if entry.type in PARALLEL_POST_TYPES and entry.verified:
            if self._entry_stmts == 1:
                sql = _INDEX_SQL if entry.type == "INDEX" else _CONSTRAINT_SQL
                t = sql.match(self._head)
                entry.verified = t is not None
                if t:
                    entry.table = t.group("t").decode("utf-8", "replace")
            else:
                entry.verified = _INDEX_EXTRA_SQL.match(self._head.strip()) is not None

    # ------------------------------------------------------------------ lexer

    def _skip_quoted(self, line: bytes, i: int) -> int:  # noqa: PLR0911 - one per quote kind
        """Inside a quote or comment: where it closes on this line, or -1 (still open)."""
        n = len(line)
        if self._comment_depth:
            o, c = line.find(b"/*", i), line.find(b"*/", i)
            if c < 0:
                self._comment_depth += line.count(b"/*", i)
                return -1
            self._comment_depth += 1 if 0 <= o < c else -1
            return o + 2 if 0 <= o < c else c + 2
        q = self._quote
        if q in ("'", '"'):
            ch = b"'" if q == "'" else b'"'
            j = line.find(ch, i)
            if j < 0:
                return -1
            if line[j + 1: j + 2] == ch:  # doubled: still inside
                return j + 2
            self._quote = None
            return j + 1
        if q == "E'":
            j = i
            while j < n and line[j] not in (0x27, 0x5C):
                j += 1
            if j >= n:
                return -1
            if line[j] == 0x5C or line[j + 1: j + 2] == b"'":  # backslash escape or ''
                return j + 2
            self._quote = None
            return j + 1
        assert isinstance(q, bytes)  # noqa: S101 - a dollar tag
        j = line.find(q, i)
        if j < 0:
            return -1
        self._quote = None
        return j + len(q)

    def _lex(self, line: bytes, start: int) -> None:
        """Track quotes and statement ends over one line (outside COPY data)."""
        i = 0
        n = len(line)
        while i < n:
            if self._comment_depth or self._quote is not None:
                i = self._skip_quoted(line, i)
                if i < 0:
                    return
                continue
            m = _TOKEN.search(line, i)
            if m is None:
                if line[i:].strip():
                    self._in_stmt = True
                return
            if line[i: m.start()].strip():
                self._in_stmt = True
            tok = m.group()
            i = m.end()
            if tok == b"--":
                return
            if tok == b"/*":
                self._comment_depth = 1
                continue
            if tok == b";":
                self._in_stmt = False
                rest = line[i:].strip()
                if _COPY.match(self._first_line) and not rest:
                    self._start_copy(start + n + 1)
                    return
                if rest and not rest.startswith(b"--"):
                    self._first_line = rest
                continue
            self._in_stmt = True
            before = line[m.start() - 1: m.start()] if m.start() else b""
            after_ident = bool(before) and _IDENT_CHAR.match(before) is not None
            if tok in (b"E'", b"e'"):
                self._quote = "'" if after_ident else "E'"
            elif tok == b"'":
                self._quote = "'"
            elif tok == b'"':
                self._quote = '"'
            elif not after_ident:  # `a$b$` is an identifier, not a dollar quote
                self._quote = tok

    def _start_copy(self, header_end: int) -> None:
        entry = self._entry
        db = self._dbs[-1] if self._dbs else None
        m = _COPY.match(self._first_line)
        if entry is None or db is None or entry.type != "TABLE DATA":
            # Still skip its rows correctly, but do not parallelize what cannot be placed.
            if db is not None and db.connect_line is not None:
                self._db_fallback("COPY outside a TABLE DATA entry")
            else:
                self._fatal = self._fatal or "COPY outside a database section"
            entry = Entry("COPY", "", "", header_end, header_end)
        if m and entry.table is None:
            entry.table = m.group("table").decode("utf-8", "replace")
        entry.header_end = header_end
        entry.rows = 0
        self._copy = entry
        self._tail = b"\n"  # the COPY line's newline: an empty block is just `\\.`
        self._next_split = header_end + SPLIT_EVERY

    # ------------------------------------------------------------------ sections

    def _end_entry(self, at: int) -> None:
        entry = self._entry
        if entry is not None and entry.end == entry.start:
            entry.end = at  # an entry with only comments
        self._entry = None

    def _db_fallback(self, reason: str) -> None:
        if self._dbs and self._dbs[-1].index.fallback is None:
            self._dbs[-1].index.fallback = reason

    def _close_db(self, end: int) -> None:
        if not self._dbs or self._dbs[-1].index.end:
            return
        db = self._dbs[-1]
        content_end = db.content_end if db.content_end is not None else end
        self._end_entry(content_end)
        db.index.end = end
        db.index.entries = len(db.entries)
        if db.connect_line is None:
            self._fatal = self._fatal or f"database section {db.index.name!r} has no \\connect"
            return
        _plan_sections(db, content_end)


def _connect_target(line: bytes) -> str | None:
    text = line.decode("utf-8", "replace").strip()
    return parse_connect_target(text[len("\\connect"):]) if text.startswith("\\connect") \
        else None


def _plan_sections(db: _Db, content_end: int) -> None:
    """Split the entries of a database into pre-data, data and post-data (or fall back)."""
    idx = db.index
    if not db.preamble_done:
        idx.preamble = (idx.connect[1], content_end)
    entries = db.entries
    data_pos = [i for i, e in enumerate(entries) if e.type in DATA_TYPES]
    if not data_pos:
        idx.pre = (idx.preamble[1], content_end)
        return
    first, last = data_pos[0], data_pos[-1]
    if last - first + 1 != len(data_pos):
        odd = next(e for e in entries[first:last] if e.type not in DATA_TYPES)
        idx.fallback = idx.fallback or f"{odd.type} entry between data entries"
        return
    data_start = entries[first].start
    for kind, at in db.between:
        if kind == "other" and data_start <= at < content_end:
            idx.fallback = idx.fallback or "a statement outside any pg_dump entry after pre-data"
            return
    idx.pre = (idx.preamble[1], data_start)
    idx.tables = [(e.schema, e.name) for e in entries[:first] if e.type == "TABLE"]
    idx.data = entries[first: last + 1]
    post = entries[last + 1:]
    post_start = post[0].start if post else content_end
    for kind, at in db.between:
        if kind == "meta" and data_start <= at < post_start:
            idx.fallback = idx.fallback or "psql meta-commands between data entries"
            return
    # Index-backed post-data entries run concurrently, up to the first entry of another kind
    # or a reconnect: nothing an index depends on can come after that point.
    barrier = content_end
    kinds: dict[str, int] = {}
    for e in post:
        kinds[e.type] = kinds.get(e.type, 0) + 1
        eligible = e.type in PARALLEL_POST_TYPES and e.verified
        if barrier == content_end and not eligible and e.type not in TRANSPARENT_POST_TYPES:
            barrier = e.start
    for kind, at in db.between:
        if kind == "meta" and post_start <= at < barrier:
            barrier = at
    idx.post_parallel = [e for e in post if e.type in PARALLEL_POST_TYPES and e.verified
                         and e.start < barrier]
    # The rest in dump order. A gap between two parallel entries that holds no entry, setting
    # or meta-command is blank lines and comments: not worth a range of its own.
    parallel = {id(e) for e in idx.post_parallel}
    starts = sorted([e.start for e in post if id(e) not in parallel]
                    + [at for _kind, at in db.between if at >= post_start])
    serial: list[Range] = []
    cursor = post_start
    for stop, resume in [*((e.start, e.end) for e in idx.post_parallel),
                         (content_end, content_end)]:
        i = bisect.bisect_left(starts, cursor)
        if stop > cursor and i < len(starts) and starts[i] < stop:
            serial.append((cursor, stop))
        cursor = resume
    idx.post_serial = serial
    idx.post_kinds = kinds


def index_file(path: Path | str, *, chunk_size: int = 4 * 1024 * 1024) -> DumpIndex:
    """Index a dump on disk (the operator indexes the stream instead)."""
    indexer = DumpIndexer()
    with Path(path).open("rb") as f:
        while chunk := f.read(chunk_size):
            indexer.feed(chunk)
    return indexer.finish()
