"""Realistic `pg_dumpall` text for test and benchmark backups.

Why this exists: the decryption/decompression speed and the compression ratio of a backup
depend on what is inside it. Zeros or random bytes would make gzip look either absurdly fast
or useless; real dumps are mostly `COPY … FROM stdin` rows of ids, names, e-mail addresses,
timestamps, amounts and free text, which gzip shrinks 3-6x. This module writes text of that
shape, deterministically from a seed, at a few hundred MB/s so a 1 GB benchmark dump is cheap.

How: a pool of distinct row blocks is generated once (random words, numbers, UUIDs), then
emitted table after table with a fresh `COPY` header each. gzip's window is 32 KiB, so
reusing 4 MiB blocks does not make the data compress better than unique rows would.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

_WORDS = (  # noqa: SIM905 - a word list reads best as prose
    "alpha beta gamma delta invoice order customer payment shipped pending cancelled refund "
    "berlin hamburg munich cologne frankfurt stuttgart dresden leipzig bremen hannover "
    "widget gadget sprocket bracket flange gasket bearing spindle valve nozzle "
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt "
    "ut labore et dolore magna aliqua enim ad minim veniam quis nostrud exercitation ullamco "
    "laboris nisi aliquip ex ea commodo consequat duis aute irure in reprehenderit voluptate"
).split()
_FIRST = "anna ben clara david emma felix greta hans ida jonas karla lukas mia noah paul".split()  # noqa: SIM905
_LAST = "muller schmidt schneider fischer weber meyer wagner becker schulz hoffmann koch".split()  # noqa: SIM905
_STATUS = ("paid", "open", "shipped", "refunded", "\\N")
_DOMAINS = ("example.com", "example.org", "mail.test", "corp.example")

HEADER = """--
-- PostgreSQL database cluster dump
--

SET default_transaction_read_only = off;

SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;

--
-- Roles
--

CREATE ROLE a9s_app;
ALTER ROLE a9s_app WITH NOSUPERUSER INHERIT NOCREATEROLE NOCREATEDB LOGIN NOREPLICATION NOBYPASSRLS PASSWORD 'SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0$c3RvcmVka2V5:c2VydmVya2V5';
CREATE ROLE repmgr;
ALTER ROLE repmgr WITH SUPERUSER INHERIT CREATEROLE CREATEDB LOGIN REPLICATION NOBYPASSRLS;

--
-- Databases
--

CREATE DATABASE shop WITH TEMPLATE = template0 ENCODING = 'UTF8' LOCALE_PROVIDER = libc LOCALE = 'en_US.UTF-8';
ALTER DATABASE shop OWNER TO a9s_app;

\\connect shop

SET statement_timeout = 0;
SET lock_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);

"""  # noqa: E501 - SQL as pg_dumpall writes it

TABLE_DDL = """
--
-- Name: {name}; Type: TABLE; Schema: public; Owner: a9s_app
--

CREATE TABLE public.{name} (
    id bigint NOT NULL,
    ref text NOT NULL,
    customer text NOT NULL,
    email text,
    created_at timestamp with time zone NOT NULL,
    amount numeric(12,2),
    status text,
    currency character(3) DEFAULT 'EUR'::bpchar NOT NULL,
    active boolean DEFAULT true NOT NULL,
    country character(2),
    note text
);

ALTER TABLE public.{name} OWNER TO a9s_app;

--
-- Data for Name: {name}; Type: TABLE DATA; Schema: public; Owner: a9s_app
--

COPY public.{name} (id, ref, customer, email, created_at, amount, status, currency, active, country, note) FROM stdin;
"""  # noqa: E501 - SQL as pg_dumpall writes it

FOOTER = """
--
-- PostgreSQL database dump complete
--

--
-- PostgreSQL database cluster dump complete
--

"""


def _ref(rng: random.Random, row_id: int) -> str:
    # One row in eight carries a random UUID (the worst case for gzip); the others carry an
    # order number, as most business tables do.
    if row_id % 8 == 0:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return f"ORD-2024-{row_id:09d}"


def _row_block(rng: random.Random, first_id: int, target: int) -> bytes:
    lines: list[str] = []
    size = 0
    row_id = first_id
    while size < target:
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        note = " ".join(rng.choices(_WORDS, k=rng.randint(6, 24)))
        line = (
            f"{row_id}\t{_ref(rng, row_id)}\t{first.title()} "
            f"{last.title()}\t{first}.{last}{rng.randint(1, 999)}@{rng.choice(_DOMAINS)}\t"
            f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} "
            f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}"
            f".{rng.randint(0, 999999):06d}+00\t{rng.randint(0, 999999) / 100:.2f}\t"
            f"{rng.choice(_STATUS)}\tEUR\t{'t' if row_id % 7 else 'f'}\tDE\t{note}\n"
        )
        lines.append(line)
        size += len(line)
        row_id += 1
    return "".join(lines).encode()


def iter_dump(
    size: int, *, seed: int = 1, block_size: int = 4 << 20, pool: int = 8
) -> Iterator[bytes]:
    """Yield about `size` bytes (at least the header and footer) of pg_dumpall-like text."""
    rng = random.Random(seed)
    blocks = [
        _row_block(rng, i * 1_000_000, min(block_size, max(size // pool, 512))) for i in range(pool)
    ]
    header = HEADER.encode()
    yield header
    written = len(header)
    table = 0
    while written < size:
        ddl = TABLE_DDL.format(name=f"orders_{table:04d}").encode()
        block = blocks[rng.randrange(len(blocks))]
        remaining = max(size - written - len(ddl) - 4, 0)
        if remaining < len(block):
            # Cut at a line end so the COPY data stays well formed.
            cut = block.rfind(b"\n", 0, remaining) + 1
            block = block[:cut]
        yield ddl
        yield block
        yield b"\\.\n"
        written += len(ddl) + len(block) + 4
        table += 1
        if not block:
            break
    yield FOOTER.encode()


def write_dump(target: Path | BinaryIO, size: int, *, seed: int = 1) -> int:
    """Write a dump of about `size` bytes to a path or binary file; return the bytes written."""
    total = 0
    if isinstance(target, Path):
        with target.open("wb") as f:
            return write_dump(f, size, seed=seed)
    for piece in iter_dump(size, seed=seed):
        target.write(piece)
        total += len(piece)
    return total
